"""House of Cards Table 3's pipeline: Spec-Bench's reader, the assistant's turns, prometheus-eval's judging (its
prompts, parser and retries, imported) run by mwjax, and the Table 3 summary."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import urllib.request

import pytest

pytest.importorskip("prometheus_eval")

from prometheus_eval import PrometheusEval  # noqa: E402
from prometheus_eval.mock import MockLLM  # noqa: E402
from prometheus_eval.prompts import ABSOLUTE_PROMPT  # noqa: E402
from prometheus_eval.utils import batch_completions_with_retries  # noqa: E402

from mwjax import converters
from mwjax.eval import generation_tasks, judge, spec_bench  # noqa: E402
from mwjax.experiments import plots

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a line about rain.", "Rewrite it to rhyme."]},
    {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]},
    {"question_id": 161, "category": "translation", "turns": ["Translate German to English: Danke."],
     "reference": "Thanks."},
    {"question_id": 241, "category": "qa", "turns": ["Capital of Italy?"]},
]


def write_questions(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reader_maps_categories_to_subtasks_and_table3_columns(tmp_path):
    path = write_questions(tmp_path / "question.jsonl", QUESTIONS)
    qs = spec_bench.read_questions(path, subtasks=["mt_bench", "translation", "qa"])
    assert [q.subtask for q in qs] == ["mt_bench", "mt_bench", "translation", "qa"]
    assert [q.column(t) for q in qs for t in range(len(q.turns))] == ["mt_1", "mt_2", "mt_1", "mt_2",
                                                                      "translation", "qa"]
    assert qs[1].reference == ("4", "6") and qs[2].reference == ("Thanks.",) and qs[0].reference is None
    assert [q.question_id for q in spec_bench.read_questions(path, per_subtask=1,
                                                             subtasks=["mt_bench", "qa"])] == [81, 241]
    with pytest.raises(ValueError, match=r"no questions of subtask\(s\) \['summarization', 'math_reasoning', 'rag'\]"):
        spec_bench.read_questions(path)  # all six subtasks by default


@pytest.mark.parametrize("line, message", [
    ("{not json", "question.jsonl:2: not JSON"),
    (json.dumps({"question_id": 9, "turns": ["x"]}), r"question.jsonl:2: missing field\(s\) \['category'\]"),
    (json.dumps({"question_id": 9, "category": "poetry", "turns": ["x"]}), "question.jsonl:2: unknown category"),
    (json.dumps({"question_id": 9, "category": "qa", "turns": []}), "question.jsonl:2: 'turns' must be"),
    (json.dumps({"question_id": 81, "category": "qa", "turns": ["x"]}), r"repeated question_id\(s\) \[81\]"),
])
def test_reader_names_the_file_and_line_of_a_bad_question(tmp_path, line, message):
    path = tmp_path / "question.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        spec_bench.read_questions(path, subtasks=["mt_bench"])
    with pytest.raises(FileNotFoundError, match="no Spec-Bench question file"):
        spec_bench.read_questions(tmp_path / "missing.jsonl")


def test_hub_reads_spec_benchs_repository(monkeypatch):
    class Response:
        def __init__(self, url):
            assert url == spec_bench.HUB_URL
        def read(self):
            return "".join(json.dumps(r) + "\n" for r in QUESTIONS).encode()
        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(url))
    assert len(spec_bench.read_questions("hub", subtasks=["qa"])) == 1

    def offline(url, timeout):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="cannot download Spec-Bench's questions from https://raw.githubusercontent"):
        spec_bench.read_questions("hub")


def test_judge_sampling_and_retry_budget_are_prometheus_evals():
    seen = []

    class Recorder:
        def completions(self, inputs, **params):
            seen.append(params)
            return ["Fine. [RESULT] 3"] * len(inputs)

    assert batch_completions_with_retries(Recorder(), ["x"], mode="absolute") == (["Fine. [RESULT] 3"], [3])
    assert seen == [judge.PROMETHEUS_PARAMS | {"use_tqdm": True}]  # what it samples with when given no params
    assert inspect.signature(batch_completions_with_retries).parameters["max_retries"].default == judge.MAX_RETRIES


def test_judge_prompt_is_prometheus_evals(smollm2_tokenizer):
    sent = []

    class Recorder(MockLLM):
        def completions(self, prompts, use_tqdm=False, **kwargs):
            sent.extend(prompts)
            return super().completions(prompts, use_tqdm, **kwargs)

    item = judge.Item("Translate German to English: Danke.", "Thanks!", "Thanks.")
    rubric = judge.load_rubric("helpfulness", "absolute")
    PrometheusEval(Recorder("absolute"), absolute_grade_template=ABSOLUTE_PROMPT).single_absolute_grade(
        item.instruction, item.response, rubric, item.reference)
    PrometheusEval(Recorder("absolute")).single_absolute_grade(item.instruction, item.response, rubric)
    ours = [judge.judge_messages(item, rubric), judge.judge_messages(judge.Item(item.instruction, item.response),
                                                                      rubric)]
    assert sent == ours and "###Reference Answer (Score 5):\nThanks." in ours[0][1]["content"]
    assert "Reference Answer" not in ours[1][1]["content"]
    # the vLLM path's prompt (PrometheusEval._get_conversation_prompt), stripped and tokenized with bos
    text = PrometheusEval._get_conversation_prompt(None, ours[0])
    assert judge.render(ours[0], smollm2_tokenizer) == smollm2_tokenizer(text.strip()).input_ids
    assert text.startswith("[INST] You are a fair judge") and text.endswith("[/INST]")
    chat = judge.render(ours[0], smollm2_tokenizer, "chat_template")
    assert smollm2_tokenizer.decode(chat).startswith("<|im_start|>system\nYou are a fair judge")


def test_grade_parses_counts_and_retries_as_prometheus_eval(monkeypatch, smollm2_tokenizer):
    """Scripted judge outputs per pass (crafted for prometheus-eval's parser): parsed at once, parsed on the
    first retry, never parsed (a score out of 1-5, then no score at all)."""
    script = {"item0": ["Clear and correct. [RESULT] 4"],
              "item1": ["I think it is good", "Mostly helpful. Score: 3/5"],
              "item2": ["Great! [RESULT] 7"] + ["Great!"] * 3}
    calls = []

    def fake_generate_many(model, prompts, max_new_tokens, **kwargs):
        calls.append({"n": len(prompts), "max_new_tokens": max_new_tokens} | kwargs)
        out = []
        for ids in prompts:
            key = next(k for k in script if k in smollm2_tokenizer.decode(ids))
            out.append(smollm2_tokenizer(script[key].pop(0), add_special_tokens=False).input_ids)
        return out

    monkeypatch.setattr("mwjax.eval.decoding.generate_many", fake_generate_many)  # what judge samples with
    items = [judge.Item(f"Say item{i}.", f"item{i}") for i in range(3)]
    got = judge.grade(None, smollm2_tokenizer, items, max_retries=3, seed=5)
    assert [j.score for j in got] == [4, 3, None]
    assert [j.retries for j in got] == [0, 1, 3]
    assert got[0].feedback == "Clear and correct. [RESULT] 4"  # prometheus-eval keeps the whole output
    assert got[2].feedback == judge.FAILED and got[2].outputs == ("Great! [RESULT] 7", "Great!", "Great!", "Great!")
    assert [c["n"] for c in calls] == [3, 2, 1, 1]  # every pass re-generates only the unparsed
    assert {(c["temperature"], c["top_p"], c["repetition_penalty"], c["max_new_tokens"]) for c in calls} == {
        (1.0, 0.9, 1.03, 1024)}
    assert len({c["seed"] for c in calls}) == 4  # a retry is a fresh sample
    with pytest.raises(ValueError, match="best_of"):
        judge.grade(None, smollm2_tokenizer, items, params={"best_of": 2})


def test_table3_means_columns_then_averages_them(tmp_path):
    qs = [spec_bench.parse_question(json.dumps(q), "q") for q in QUESTIONS]
    scores = spec_bench.table3(qs, [[4, 2], [5, None], [3], [None]])
    assert scores == {"mt_1": 4.5, "mt_2": 2.0, "translation": 3.0, "avg": (4.5 + 2.0 + 3.0) / 3}
    assert spec_bench.table3_row(scores) == [4.5, 2.0, 3.0, "-", "-", "-", "-", scores["avg"]]
    assert spec_bench.table3(qs[3:], [[None]]) == {"avg": None}
    assert plots.likert_bars({"MT-1": 4.5, "Avg.": 3.2}, "t", tmp_path / "bars.png").stat().st_size > 0
    assert spec_bench.instruction(qs[0], ["Rain falls.", "x"], 1) == (
        "User: Write a line about rain.\n\nAssistant: Rain falls.\n\nUser: Rewrite it to rhyme.")


def test_experiment_on_a_tiny_random_assistant_judging_itself(tiny_smol_dir, tmp_path):
    """experiments.generation end to end: a random judge never writes a parseable score, so every judgement is
    retried to the budget, counted, and left out of the means."""
    questions = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    out = subprocess.run([sys.executable, "-m", "experiments.generation", f"--model={tiny_smol_dir}",
                          f"--judge={tiny_smol_dir}", "--judge_prompt=chat_template", f"--questions={questions}",
                          "--subtasks=mt_bench,qa", "--per_subtask=1", "--max_new_tokens=3",
                          "--judge_max_new_tokens=3", "--judge_max_retries=2", "--batch_size=2", "--label=tiny",
                          f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert summary["scores"] == {"avg": None}
    assert summary["counts"] == {c: {"judged": 1, "unparsed_first": 1, "retries": 2, "failed": 1}
                                 for c in ("mt_1", "mt_2", "qa")}
    records = [json.loads(line) for line in (tmp_path / "out" / "generation.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in records] == [81, 241] and len(records[0]["answers"]) == 2
    assert [j["column"] for j in records[0]["judgements"]] == ["mt_1", "mt_2"]
    assert all(len(j["outputs"]) == 3 and j["feedback"] == judge.FAILED for r in records for j in r["judgements"])
    assert "| tiny | - | - | - | - | - | - | - | - |" in (tmp_path / "out" / "generation.md").read_text()
    assert "3 judgement(s) never parsed" in out.stdout


@pytest.mark.slow
def test_smollm2_answers_and_judges_itself(tmp_path):
    """The whole pipeline on the real SmolLM2 as assistant and judge (a pipeline check, not a result)."""
    model, tokenizer = converters.load("embedded:smollm2")
    qs = [spec_bench.parse_question(json.dumps(q), "test") for q in QUESTIONS[2:]]  # one turn each: 2 programs
    answers = spec_bench.answer(model, tokenizer, qs, 6, batch_size=1)
    assert all(a for turns in answers for a in turns)  # real words, not an empty decode
    # retries are covered above; here one judge pass keeps the test short
    records, summary = generation_tasks.judge_answers(model, tokenizer, qs, answers, max_retries=0,
                                                      params={"max_tokens": 6}, prompt_format="chat_template",
                                                      batch_size=1)
    judged = [j for r in records for j in r["judgements"]]
    assert len(judged) == 2 and all(j["score"] in (None, 1, 2, 3, 4, 5) for j in judged)
    assert all(j["retries"] == 0 and len(j["outputs"]) == 1 and j["outputs"][0] for j in judged)
    assert list(summary["counts"]) == ["translation", "qa"]
