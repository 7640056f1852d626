"""LongBench (House of Cards Table 9) through lm-eval with the mwjax backend: LongBench's middle truncation, its
chat-template rule, the same generations as lm-eval's HF backend, and the experiment from local task data."""

import copy
import json
import re
import subprocess
import sys

import jax.numpy as jnp
import pytest
from longbench_docs import TREC_CLASSES, write_task_data

lm_eval = pytest.importorskip("lm_eval")
for _metric_dependency in ("jieba", "fuzzywuzzy", "rouge"):  # lm-eval's LongBench metrics
    pytest.importorskip(_metric_dependency)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from mwjax import converters  # noqa: E402
from mwjax.eval import longbench  # noqa: E402
from mwjax.eval.lm_eval import MwjaxLM, middle_truncate  # noqa: E402

DATASETS = ("hotpotqa", "trec")  # chat-templated QA (qa_f1), few-shot (classification); code: the CLI test
INSTRUCTION, QUESTION = "Instruction: keep this.", " Question: what is left?"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_task_data(tmp_path_factory.mktemp("longbench_data"))


@pytest.fixture(scope="module")
def tiny(tiny_smol_vocab):
    hf, path = tiny_smol_vocab
    model, _ = converters.load(path, tokenizer=False)
    return hf, model, path


def generation(*contexts, max_gen_toks=8):
    return [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False}), i)
            for i, c in enumerate(contexts)]


def test_middle_truncation_keeps_both_ends_exactly(smollm2_tokenizer):
    """pred.py: over max_length tokens, the first and last max_length // 2 tokens, decoded without bos, joined."""
    tok = smollm2_tokenizer
    n_head, n_tail = len(tok.encode(INSTRUCTION)), len(tok.encode(QUESTION))
    assert tok.encode(" x" * 3) == tok.encode(" x") * 3  # the filler is one token per " x"
    text = INSTRUCTION + " x" * 100 + QUESTION
    assert middle_truncate(tok, text, 20) == INSTRUCTION + " x" * (10 - n_head) + " x" * (10 - n_tail) + QUESTION
    assert middle_truncate(tok, text, 21) == middle_truncate(tok, text, 20)  # half = int(21 / 2), as pred.py
    exact = INSTRUCTION + " x" * (30 - n_head - n_tail) + QUESTION  # 30 tokens: not over the limit, kept whole
    assert middle_truncate(tok, exact, 30) == exact and middle_truncate(tok, exact, 29) != exact
    with_bos = copy.deepcopy(tok)  # a tokenizer that adds bos (Llama's): bos counts in the first half, then goes
    with_bos.add_bos_token = True
    assert with_bos.encode(text)[0] == tok.bos_token_id
    assert middle_truncate(with_bos, text, 20) == INSTRUCTION + " x" * (9 - n_head) + " x" * (10 - n_tail) + QUESTION


def test_generate_until_cuts_prompts_in_the_middle(tiny, smollm2_tokenizer):
    _, model, _ = tiny
    long, short = INSTRUCTION + " x" * 60 + QUESTION, INSTRUCTION + QUESTION
    cut = MwjaxLM(model, smollm2_tokenizer, batch_size=2, truncation="middle", max_prompt_length=24)
    plain = MwjaxLM(model, smollm2_tokenizer, batch_size=2)
    expected = plain.generate_until(generation(middle_truncate(smollm2_tokenizer, long, 24), short))
    assert cut.generate_until(generation(long, short)) == expected


def test_chat_template_wraps_the_prompt_after_the_cut(tiny, smollm2_tokenizer):
    """LongBench cuts the prompt, then builds the chat prompt around it: the template's own tokens are not cut,
    and generate_until does not cut the templated prompt again."""
    _, model, _ = tiny
    tok = smollm2_tokenizer
    long = INSTRUCTION + " x" * 60 + QUESTION
    cut = MwjaxLM(model, tok, batch_size=1, truncation="middle", max_prompt_length=24)
    rendered = cut.apply_chat_template([{"role": "user", "content": long}])
    assert rendered == tok.apply_chat_template([{"role": "user", "content": middle_truncate(tok, long, 24)}],
                                               tokenize=False, add_generation_prompt=True)
    assert len(tok.encode(rendered)) > 24  # over the limit with the template, yet generated from as it is
    plain = MwjaxLM(model, tok, batch_size=1)
    assert cut.generate_until(generation(rendered)) == plain.generate_until(generation(rendered))


def test_truncation_options_are_checked_and_reach_the_backend(tiny):
    _, model, path = tiny
    with pytest.raises(ValueError, match="truncation='right'"):
        MwjaxLM(model, object(), truncation="right")
    with pytest.raises(ValueError, match="max_prompt_length"):
        MwjaxLM(model, object(), truncation="middle")
    from mwjax.experiments.lm_eval_model import MwjaxPretrainedLM

    lm = MwjaxPretrainedLM.create_from_arg_string(f"pretrained={path},truncation=middle,max_prompt_length=7500")
    assert (lm.truncation, lm.max_prompt_length) == ("middle", 7500)


def test_tasks_are_lm_evals_longbench_tasks(data_dir, tmp_path):
    """Table 9's 16 datasets are lm-eval's English LongBench tasks, read from the hub copy HUB; local records in
    either field naming become the same task documents."""
    tasks_dir = longbench.lm_eval_tasks_dir() / "longbench"
    for name in longbench.DATASETS:
        config = (tasks_dir / f"{name}.yaml").read_text()
        assert re.search(rf"^dataset_path: {re.escape(longbench.HUB)}$", config, re.M), name
        assert re.search(rf"^task: longbench_{re.escape(name)}$", config, re.M), name
    tasks = longbench.write_local_tasks(data_dir, tmp_path, ["hotpotqa", "trec"])
    assert tasks == {"hotpotqa": "longbench_hotpotqa_local", "trec": "longbench_trec_local"}
    for name in tasks:
        docs = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert [d["question"] for d in docs] == [d.get("input", d.get("question")) for d in
                                                 map(json.loads, (data_dir / f"{name}.jsonl").read_text().splitlines())]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "lcc.jsonl").write_text(json.dumps({"context": "x", "answers": "not a list"}) + "\n")
    with pytest.raises(ValueError, match=r"lcc.jsonl:1: .*list of answers"):
        longbench.write_local_tasks(tmp_path / "bad", tmp_path / "inc", ["lcc"])
    with pytest.raises(FileNotFoundError, match="export_data"):
        longbench.check_datasets(["qasper"], data_dir)
    with pytest.raises(ValueError, match="unknown LongBench dataset 'lsht'"):
        longbench.check_datasets(["lsht"])


def test_longbench_through_lm_eval_matches_the_hf_backend(tiny, smollm2_tokenizer, data_dir):
    """The same prompts (chat template on hotpotqa only), generations and LongBench scores as lm-eval's HF backend,
    with prompts under the limit (the HF backend has no middle truncation)."""
    hf, model, _ = tiny
    evaluate = longbench.Evaluator(DATASETS, data_dir=data_dir, batch_size=2, max_gen_toks=8)
    scores, raw = evaluate(model, smollm2_tokenizer)
    assert raw["chat_template"] == ["hotpotqa"]
    ref_lm = HFLM(pretrained=hf, tokenizer=smollm2_tokenizer, batch_size=2)
    for apply, names in ((True, ["hotpotqa"]), (False, ["trec"])):
        ref = lm_eval.simple_evaluate(model=ref_lm, tasks=[evaluate.tasks[n] for n in names], num_fewshot=0,
                                      task_manager=evaluate.manager, apply_chat_template=apply, log_samples=True,
                                      gen_kwargs=evaluate.gen_kwargs)
        for name in names:
            ours, theirs = raw["samples"][evaluate.tasks[name]], ref["samples"][evaluate.tasks[name]]
            assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
            assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in theirs]
            assert scores[name] == pytest.approx(100 * ref["results"][evaluate.tasks[name]]["score,none"])
            assert ours[0]["arguments"][0][0].startswith("<|im_start|>system") == apply
    assert scores["mean"] == pytest.approx(sum(scores[n] for n in DATASETS) / len(DATASETS))
    assert set(longbench.predictions(raw["samples"], evaluate.tasks, n=1)["trec"][0]) == {"prediction", "answers",
                                                                                          "score"}


def test_longbench_experiment_and_table9(tiny_smol_dir, data_dir, tmp_path):
    from mwjax.experiments import tables

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.longbench", f"--model={tiny_smol_dir}", f"--data_dir={data_dir}",
           "--datasets=trec,lcc", "--limit=1", "--max_length=32", "--max_gen_toks=4", "--batch_size=1", "--label=tiny",
           f"--output_dir={out}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = json.loads((out / "longbench.json").read_text())
    assert set(run["scores"]) == {"trec", "lcc", "mean"} and run["max_length"] == 32 and run["label"] == "tiny"
    assert run["add_bos_token"] == "tokenizer" and run["chat_template"] == []  # neither is chat-templated
    assert (out / "longbench.png").stat().st_size > 0
    markdown = (out / "longbench.md").read_text()
    assert "| TREC |" in markdown and "| tiny* |" in markdown and "--max_length=32" in markdown
    row = tables.table9_row(run)
    assert row[:2] == [str(tiny_smol_dir), "tiny*"] and row[2] == "-" and len(row) == 2 + 16 + 1
    assert row[2 + longbench.DATASETS.index("trec")] == run["scores"]["trec"]
    assert tables.longbench_departure(run) == "--limit=1, 2 of the 16 datasets, --max_length=32, --max_gen_toks=4"
    assert tables.longbench_departure(run | {"limit": None, "max_length": 7500, "max_gen_toks": None,
                                             "scores": dict.fromkeys([*longbench.DATASETS, "mean"], 1.0)}) is None


@pytest.mark.slow
def test_smollm2_longbench_pipeline(smollm2_path, smollm2_tokenizer, data_dir):
    """The real SmolLM2 on a few-shot document (the generations equal lm-eval's HF backend's on the tiny model
    above): the few-shot prompt reaches it whole, so it answers with a TREC class."""
    model, _ = converters.load(smollm2_path, dtype=jnp.float32, tokenizer=False)
    evaluate = longbench.Evaluator(["trec"], data_dir=data_dir, limit=1, batch_size=1, max_gen_toks=16)
    scores, raw = evaluate(model, smollm2_tokenizer)
    said = {name: p[0]["prediction"] for name, p in longbench.predictions(raw["samples"], evaluate.tasks).items()}
    print(f"SmolLM2 on one local document: {scores}; {said}")
    assert said["trec"].strip() in TREC_CLASSES
