"""experiments.quantize end to end: its flags checked before a model loads, a tiny checkpoint quickly, and the
embedded SmolLM2 (slow)."""

import json
import shutil
import subprocess
import sys

import pytest
from hf_reference import tiny_tokenizer
from zeroshot_docs import write_task_data

TEXT = "the quick brown fox jumps over the lazy dog and keeps running through the quiet field " * 40


def run(*args, timeout=900):
    out = subprocess.run([sys.executable, "-m", "experiments.quantize", *args], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("args, message", [
    (["--w_bits=1"], "flag --w_bits=1: 1 is not an integer in the range [2, 16]"),
    (["--blocks=64,huge"], "block size 'huge': write a positive integer, channel or tensor"),
    (["--clip_method=block_percentage", "--clip_threshold=5"], "its threshold must lie in (0, 1)"),
    (["--alpha=1.5"], "flag --alpha=1.5"),
    (["--parts=table1"], "unknown part 'table1'"),
    (["--metrics=accuracy"], "unknown sweep metric 'accuracy'"),
    (["--curves=rtn,best"], "unknown curve 'best'"),
    (["--calibration_sequences=0"], "flag --calibration_sequences=0"),
])
def test_bad_flags_exit_2_naming_the_flag_before_the_model_loads(args, message):
    out = subprocess.run([sys.executable, "-m", "experiments.quantize", "--model=/nonexistent/model", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_quantize")
    shutil.copytree(tiny_checkpoint("llama_gqa"), root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def test_quantize_experiment_on_a_tiny_model(tiny, tmp_path):
    data = write_task_data(tmp_path)
    out = tmp_path / "out"
    stdout = run(f"--model={tiny / 'model'}", f"--datasets={tiny / 'text.txt'}", f"--calibration={tiny / 'text.txt'}",
                 "--seqlen=64", "--max_chunks=3", "--calibration_sequences=2", "--calibration_seqlen=32",
                 "--blocks=016,64,tensor", "--clip_threshold=3", "--metrics=perplexity,zeroshot", f"--data_dir={data}",
                 "--curves=rtn,held_out,clip",
                 "--limit=2", f"--output_dir={out}")
    assert "Table 3" in stdout and "Figure 7" in stdout  # and --blocks=016 is labelled 16 below
    result = json.loads((out / "quantize.json").read_text())
    rows = result["table3"]["rows"]
    assert list(rows) == ["FP", "naive W8A8", "SmoothQuant", "W8A8, super activation held out"]
    share = result["table3"]["share_of_smoothquant_gain"]["text.txt"]
    naive, sq = rows["naive W8A8"]["text.txt"]["perplexity"], rows["SmoothQuant"]["text.txt"]["perplexity"]
    if naive > sq:  # the percentages are the paper's: naive 0%, SmoothQuant 100%
        assert share["naive W8A8"] == pytest.approx(0) and share["SmoothQuant"] == pytest.approx(100)
    fig = result["figure7"]
    assert fig["blocks"] == ["16", "64", "tensor"] and fig["whole_tensor_fallback"] == {"16": 0, "64": 0,
                                                                                       "tensor": 0}
    # the tiny random model has no spike above 50: no super weight, so the held-out curve is left out
    assert fig["super_weights"] == [] and "super weights held out" not in fig["perplexity"]
    assert set(fig["perplexity"]) >= {"round-to-nearest", "clipped, not restored"}
    assert len(fig["perplexity"]["round-to-nearest"]) == 3 and len(fig["zeroshot"]["round-to-nearest"]) == 3
    for name in ("block_sweep.png", "block_sweep_zeroshot.png", "table3.md", "figure7.md"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_quantize_experiment_on_smollm2(tmp_path):
    stdout = run("--seqlen=128", "--max_chunks=2", "--calibration_sequences=4", "--calibration_seqlen=128",
                 "--blocks=256,tensor", "--batch_size=2", f"--output_dir={tmp_path}", timeout=1800)
    result = json.loads((tmp_path / "quantize.json").read_text())
    rows = {k: v["python_docs"]["perplexity"] for k, v in result["table3"]["rows"].items()}
    assert rows["naive W8A8"] > rows["FP"]  # 8-bit per-tensor activations cost something
    fig = result["figure7"]
    assert fig["super_weights"] and fig["super_weights"][0]["layer"] == 2  # SmolLM2's layers[2] down_proj [507, 90]
    assert set(fig["perplexity"]) >= {"round-to-nearest", "super weights held out", "clipped, super weights restored"}
    per_tensor = {k: v[-1] for k, v in fig["perplexity"].items() if isinstance(v, list)}
    assert per_tensor["round-to-nearest"] > 2 * fig["perplexity"]["unquantized"]  # INT4 per tensor breaks it
    assert "Figure 7" in stdout


def test_tables_print_the_super_weight_table3_as_the_paper(tmp_path):
    """The paper's Llama-7B Wiki-2 column (FP16 5.68, naive 5.83, SmoothQuant 5.71, ours 5.74 = 75%) and a Figure 7
    run, assembled by experiments.tables from a quantize.json."""
    from mwjax.research.quantize import sweep

    names = ["FP", "naive W8A8", "SmoothQuant", "W8A8, super activation held out"]
    ppl = dict(zip(names, [5.68, 5.83, 5.71, 5.74], strict=True))
    share = {n: sweep.share_of_gain(ppl["naive W8A8"], ppl["SmoothQuant"], ppl[n]) for n in names[1:]}
    payload = {"model": "llama-7B", "seqlen": 2048,
               "table3": {"rows": {n: {"wikitext2": {"perplexity": v}} for n, v in ppl.items()},
                          "share_of_smoothquant_gain": {"wikitext2": share},
                          "settings": {"w_bits": 8, "a_bits": 8}},
               "figure7": {"blocks": ["16384", "tensor"], "bits": 4, "clip_method": "zscore", "clip_threshold": 9.0,
                           "perplexity": {"unquantized": 5.68, "round-to-nearest": [6.1, 9.0],
                                          "clipped, super weights restored": [6.0, 7.0], "corpus": "wikitext2"},
                           # a zero-shot run records its settings beside the curves, lists among them
                           "zeroshot": {"unquantized": 0.61, "round-to-nearest": [0.6, 0.4], "tasks": ["piqa"],
                                        "limit": None}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "quantize.json").write_text(json.dumps(payload))
    out = subprocess.run([sys.executable, "-m", "experiments.tables", f"--runs={tmp_path}",
                          f"--output_dir={tmp_path / 'tables'}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| W8A8, super activation held out | 5.74 (75%) |" in out.stdout
    assert "| naive W8A8 | 5.83 (0%) |" in out.stdout and "| SmoothQuant | 5.71 (100%) |" in out.stdout
    assert "| tensor | 9.00 | 7.00 |" in out.stdout and "unquantized 5.68" in out.stdout
    assert "| tensor | 0.40 |" in out.stdout and "piqa" not in out.stdout
