"""The experiment CLIs end to end: on a tiny checkpoint quickly, and on the embedded SmolLM2 (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_reference import tiny_tokenizer
from zeroshot_docs import write_task_data

from mwjax.eval import longbench

TEXT = "the quick brown fox jumps over the lazy dog and keeps running through the quiet field " * 20


def run(module, *args, timeout=900):
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    path = tiny_checkpoint("llama_gqa")
    root = tmp_path_factory.mktemp("tiny_with_tokenizer")
    shutil.copytree(path, root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.mark.parametrize("module, args, message", [
    ("experiments.attacks", ["--datasets=python_docs,wikitext3"], "unknown corpus 'wikitext3'"),
    ("experiments.zeroshot", ["--attack=zero_top_k:five"], "write zero_top_k:K with an integer K"),
    ("experiments.longbench", ["--datasets=qasper,lsht"], "unknown LongBench dataset 'lsht'"),
    ("experiments.super_weight", ["--output_dir=/proc/mwjax"], "cannot write to the output directory /proc/mwjax"),
    ("experiments.generation", ["--questions=/nonexistent/q.jsonl"], "no Spec-Bench question file"),
    ("experiments.massive_weights", ["--tokenizer=none"], "tokenizes --prompt and --stats_corpus: drop --tokenizer"),
    ("experiments.attention_sinks", ["--tokenizer=None"], "tokenizes --prompt: drop --tokenizer=none"),
])
def test_bad_inputs_fail_before_the_model_loads(module, args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, "--model=/nonexistent/model", *args], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)  # the default output directory (and its lock) there
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]  # not the missing model


@pytest.fixture(scope="module")
def task_data(tiny, tmp_path_factory):
    """(local zero-shot task files, the tiny model's mean accuracy on them as experiments.zeroshot measures it)."""
    from mwjax import converters
    from mwjax.eval import zeroshot_tasks

    data = write_task_data(tmp_path_factory.mktemp("tasks"))
    model, tokenizer = converters.load(str(tiny / "model"))
    scores = zeroshot_tasks.evaluate(model, tokenizer, data_dir=data, add_bos_token=False)[0]
    return data, scores["mean"]["acc_norm"]


@pytest.mark.parametrize("module, own", [("experiments.attacks", "--sweep_metrics"),
                                         ("experiments.zeroshot", "--attack_on")])
def test_help_lists_the_shared_flags_with_the_own(module, own):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert all(f"\n  {flag}" in out.stdout for flag in (own, "--model", "--output_dir", "--adapter", "--tasks"))


def test_attacks_experiment_on_a_tiny_model(tiny, task_data):
    out = tiny / "attacks"
    data, accuracy = task_data
    stdout = run("experiments.attacks", f"--model={tiny / 'model'}", f"--datasets={tiny / 'text.txt'}",
                 "--seqlen=64", "--max_chunks=2", "--sweep=0,1,2", "--prompts=abc",
                 "--max_new_tokens=3", "--first_token=1", f"--output_dir={out}",
                 "--sweep_metrics=perplexity,zeroshot", f"--data_dir={data}")
    assert "Table 1" in stdout and "top-5 zeroing" in stdout
    result = json.loads((out / "attacks.json").read_text())
    assert set(result["settings"]) >= {"original", "top-5 zeroing", "top-5 retaining"}
    assert result["k_sweep"]["k"] == [0, 1, 2]
    # k = 0 zeroing is the original model, on the same chunks (--max_chunks caps the sweep too)
    original = result["settings"]["original"]["perplexity"]["text.txt"]
    assert result["k_sweep"]["chunks"] == len(original["chunk_nll"]) == 2
    assert result["k_sweep"]["top-k zeroing"][0] == pytest.approx(original["perplexity"], rel=1e-5)
    assert (out / "k_sweep.png").stat().st_size > 0 and (out / "table1.md").exists()
    # Figure 4 as the paper plots it: mean zero-shot accuracy, k = 0 zeroing being the unattacked model
    assert result["k_sweep_zeroshot"]["top-k zeroing"][0] == pytest.approx(accuracy, abs=1e-9)
    assert result["k_sweep_zeroshot"]["add_bos_token"] == "false" and len(result["k_sweep_zeroshot"]["k"]) == 3
    assert (out / "k_sweep_zeroshot.png").stat().st_size > 0


def test_massive_weights_and_super_weight_experiments_on_a_tiny_model(tiny, task_data):
    out = tiny / "mw"
    stdout = run("experiments.massive_weights", f"--model={tiny / 'model'}", f"--stats_corpus={tiny / 'text.txt'}",
                 "--stats_sequences=2", "--stats_seqlen=32", "--first_token=1", "--prompt=abc", f"--output_dir={out}")
    assert "| model | layer (paper) | HF layer | top-5 indices |" in stdout
    result = json.loads((out / "massive_weights.json").read_text())
    assert result["massive_weights"]["paper_layer"] == result["massive_weights"]["layer"] + 1
    for figure in ("bos_hidden", "bos_intermediate", "states", "corpus_hidden", "magnitudes_3d"):
        assert (out / f"{figure}.png").stat().st_size > 0
    states = result["states"]  # Figure 3(a): h_{l-1} ... h_l, the FFN's gate and up factors included
    assert list(states) == ["previous_hidden", "attn_input", "attn_output", "attn_residual", "mlp_input",
                            "up_proj_output", "gate_activation", "intermediate", "down_proj_output", "hidden"]
    assert states["previous_hidden"][1:] == states["hidden"][:-1]
    out = tiny / "sw"
    stdout = run("experiments.super_weight", f"--model={tiny / 'model'}", f"--datasets={tiny / 'text.txt'}",
                 "--layer=1", "--row=3", "--col=7", "--seqlen=64", "--max_chunks=1", "--factors=0,1",
                 "--generation_prompt=abc", f"--output_dir={out}", "--scaling_metrics=perplexity,zeroshot",
                 "--non_super_weights=50",
                 f"--data_dir={task_data[0]}", "--format=svg")
    result = json.loads((out / "super_weight.json").read_text())
    assert set(result["settings"]) == {"original", "prune SW", "prune SW, +SA", "prune Non-SW"}
    assert "prune Non-SW (50 largest others)" in stdout
    assert result["scaling"]["perplexity"][1] == pytest.approx(
        result["settings"]["original"]["perplexity"]["text.txt"], rel=1e-6)
    assert result["scaling"]["zeroshot"][1] == pytest.approx(task_data[1], abs=1e-9)  # Figure 8's metric
    assert (out / "scaling_zeroshot.svg").read_text().startswith("<?xml") and (out / "scaling.svg").exists()
    # the mechanism: Figures 3 / 10 per layer, Figure 4 from the named weight's layer on, Figure 2 III / 11
    assert len(result["down_proj_maxima"]["output"]["value"]) == 3 and result["down_proj_maxima"]["super_weight_layers"]
    assert [(t["layer"], t["row"]) for t in result["super_activation"]] == [(1, 3)]
    words = result["stopwords"]
    assert words["list"] == "mwjax.data.stopwords.STOPWORDS" and words["stopword_tokens"] == 2  # "a", "i"
    assert words["stopword_before"] + words["other_before"] == pytest.approx(1.0, abs=1e-5)
    assert len(words["rising"]) == 10 and "Figure 2 III / 11" in stdout and "Figure 4" in stdout
    for figure in ("down_proj_maxima", "super_activation", "stopwords"):
        assert (out / f"{figure}.svg").stat().st_size > 0


def test_attention_sinks_experiment_on_a_tiny_model(tiny):
    out = tiny / "sinks"
    stdout = run("experiments.attention_sinks", f"--model={tiny / 'model'}", "--prompt=abcdef", "--middle=3",
                 "--attack=zero_top_k:2", f"--output_dir={out}")
    assert "| bos in the middle | a b c <s> d e f |" in stdout
    result = json.loads((out / "attention_sinks.json").read_text())
    assert result["attack"] == "zero_top_k:2" and result["attention_layer"] == result["layer"] + 1
    assert [p["bos_position"] for p in result["placements"]] == [None, 0, 3, 6]
    assert result["tokens"]["end"] == ["a", "b", "c", "d", "e", "f", "<s>"]
    assert (out / "attention_sinks.png").stat().st_size > 0 and (out / "attention_sinks.md").exists()


def test_router_experiment_on_a_tiny_mixture_of_experts(tiny_checkpoint, tmp_path):
    stdout = run("experiments.router", f"--model={tiny_checkpoint('mixtral')}", "--tokenizer=none",
                 f"--output_dir={tmp_path}")
    assert "| layer (paper) | HF layer | top-2 experts: probability | entropy (nats) |" in stdout
    result = json.loads((tmp_path / "router.json").read_text())
    probs = result["router_probs"]
    assert len(probs) == 3 and all(len(p) == 4 and sum(p) == pytest.approx(1.0) for p in probs)
    mw = result["massive_weights"]  # the expert the router ranks first at the massive weights' layer
    assert mw["expert"] == max(range(4), key=probs[mw["layer"]].__getitem__)
    assert (tmp_path / "router.png").stat().st_size > 0 and (tmp_path / "router.md").exists()
    dense = subprocess.run([sys.executable, "-m", "experiments.router", f"--model={tiny_checkpoint('llama_gqa')}",
                            "--tokenizer=none", f"--output_dir={tmp_path}"], capture_output=True, text=True,
                           timeout=300)
    assert dense.returncode != 0 and "is a dense llama model: it has no router" in dense.stderr


@pytest.mark.slow
def test_the_main_job_on_smollm2(tmp_path):
    """The README's main command, with CPU-sized settings: zeroing hurts far more than retaining.

    Where the environment names the output of the README's main command itself (`MWJAX_MAIN_JOB_OUTPUT`: .ci/run
    runs it verbatim just before the tests), its results are the ones checked instead of a second, smaller run."""
    done = os.environ.get("MWJAX_MAIN_JOB_OUTPUT")
    if done:
        out = Path(done)
    else:
        out = tmp_path
        run("experiments.attacks", "--seqlen=256", "--max_chunks=3", "--sweep=0,5", "--sweep_chunks=1",
            "--max_new_tokens=12", "--prompts=What is the capital of France?", "--calibration_sequences=20",
            f"--output_dir={out}")
    result = json.loads((out / "attacks.json").read_text())
    assert result["model"] == "embedded:smollm2"
    ppl = {name: s["perplexity"]["python_docs"]["perplexity"] for name, s in result["settings"].items()}
    assert result["massive_weights"]["layer"] == 11
    assert ppl["top-5 zeroing"] > 1.5 * ppl["top-5 retaining"] > 1.5 * 0.5 * ppl["original"]
    assert ppl["massive activations = zero"] > 100 * ppl["original"]
    assert ppl["massive activations = mean"] == pytest.approx(ppl["original"], rel=0.05)
    gens = {name: s["generations"]["What is the capital of France?"] for name, s in result["settings"].items()}
    assert "Paris" in gens["original"] and "Paris" not in gens["top-5 zeroing"]
    # means per position class from bos-led calibration text: the chat prompt's first token keeps its own value
    # (one pooled mean gave it another, and the answer turned into French text)
    assert gens["massive activations = mean"] == gens["original"]
    assert result["massive_weights"]["indices"][:2] == [1229, 1487]


def test_tables_from_run_outputs(tmp_path):
    def zs(model, label, attack, mean):
        scores = {t: {"acc": mean, "acc_norm": mean} for t in ("arc_easy", "arc_challenge", "piqa")}
        scores |= {t: {"acc": mean} for t in ("boolq", "winogrande")}
        return {"model": model, "label": label, "attack": attack, "add_bos_token": "false",
                "scores": scores | {"mean": {"acc": mean, "acc_norm": mean}}}

    runs = {"a/zeroshot.json": zs("m", "original", None, 70.0), "b/zeroshot.json": zs("m", "original", "zero_top_k:5",
                                                                                      40.0),
            "c/zeroshot.json": zs("m", "LoRA + MacDrop", None, 76.5),
            "d/zeroshot.json": zs("m", "LoRA + MacDrop", "zero_top_k:3", 47.7) | {"attack_on": "base"},
            "f/zeroshot.json": zs("m", "DoRA", None, 60.0) | {"limit": 20}}
    ppl = lambda p: {"wikitext2": {"perplexity": p}}
    runs["e/attacks.json"] = {"model": "m", "k": 5, "seqlen": 4096, "settings": {
        "original": {"perplexity": ppl(5.75)}, "top-5 zeroing": {"perplexity": ppl(104.57)},
        "top-5 retaining": {"perplexity": ppl(10.15)}}}
    scores = {"mt_1": 3.71, "mt_2": 3.54, "translation": 4.5, "summarization": 3.24, "qa": 4.35,
              "math_reasoning": 3.64, "rag": 3.74, "avg": 3.817}  # House of Cards Table 3, Llama-3-8B LoRA
    counts = {c: {"judged": 80, "unparsed_first": 0, "retries": 0, "failed": 0} for c in scores if c != "avg"}
    generation = {"model": "m", "label": "LoRA", "attack": None, "judge": "prometheus-eval/prometheus-7b-v2.0",
                  "subtasks": ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"],
                  "per_subtask": None, "scores": scores, "counts": counts}
    runs["g/generation.json"] = generation
    runs["h/generation.json"] = generation | {"label": "original", "per_subtask": 2, "judge": "embedded:smollm2",
                                              "counts": counts | {"qa": {"judged": 2, "unparsed_first": 1,
                                                                         "retries": 10, "failed": 1}}}
    long_context = {name: 30.0 + i for i, name in enumerate(longbench.DATASETS)}
    runs["l/longbench.json"] = {"model": "m", "label": "LoRA", "max_length": 7500, "limit": None,
                                "scores": long_context | {"mean": 37.5}}
    for name, payload in runs.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(payload))
    stdout = run("experiments.tables", f"--runs={tmp_path}", f"--output_dir={tmp_path / 'tables'}", timeout=300)
    assert "| top-5 zeroing | 104.57 | 40.00 |" in stdout
    assert "| top-5 retaining | 10.15 | - |" in stdout
    assert "| m | LoRA + MacDrop | 76.50 | 76.50 | 76.50 | 76.50 | 76.50 | 76.50 |" in stdout
    assert "| m | LoRA + MacDrop | base | 76.50 | 47.70 |" in stdout  # Table 8's reading shown
    assert (tmp_path / "tables" / "tables.md").exists() and "Zero-shot runs: add_bos_token=false." in stdout
    # a run with --limit is marked, never passed off as the papers' protocol
    assert "| m | DoRA* | 60.00 | 60.00 | 60.00 | 60.00 | 60.00 | 60.00* |" in stdout
    assert "* not the papers' protocol" in stdout and "f/zeroshot.json (--limit=20)" in stdout
    assert "| m | LoRA | 3.71 | 3.54 | 4.50 | 3.24 | 4.35 | 3.64 | 3.74 | 3.82 |" in stdout
    assert "| m | original* | 3.71 |" in stdout
    assert "h/generation.json (--per_subtask=2, judge embedded:smollm2)" in stdout
    assert "judgements never parsed (left out of the means): " in stdout and "h/generation.json: 1 of 482" in stdout
    assert "## Table 9" in stdout and "| NtvQA | Qasper |" in stdout  # the paper's columns, in its order
    assert "| m | LoRA | 30.00 | 31.00 | 32.00 |" in stdout and "| 44.00 | 45.00 | 37.50 |" in stdout
    from mwjax.experiments.tables import bos_note

    mixed = bos_note([{"path": "a", "add_bos_token": "false"}, {"path": "b", "add_bos_token": "tokenizer"}])
    assert mixed.startswith("WARNING: the zero-shot runs mix add_bos_token choices") and "b: tokenizer" in mixed
