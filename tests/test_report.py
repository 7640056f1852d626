"""experiments.report (the papers' claims in miniature) and the templated multiple-choice tasks it scores."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from mwjax.eval import synthetic_tasks as st


def independent_answer(q: st.Question) -> str:
    """The right answer read back from the question's text alone (not from its key)."""
    if q.task == "addition":
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q.prompt).groups())
        return str(a + b)
    if q.task == "capitals":
        country = re.fullmatch(r"What is the capital of (.+)\?", q.prompt).group(1)
        return dict(st.CAPITALS)[country]
    listed = q.prompt.split(": ", 1)[1].rstrip("?").split(", ")
    assert sorted(listed) == sorted(q.choices)  # the listed items are the choices
    return str(min(map(int, listed))) if q.task == "smallest" else min(listed)


def test_every_answer_is_right_and_the_choices_are_distinct():
    for split in st.SPLITS:
        qs = st.questions(split, per_task=40, seed=3)
        assert {q.task for q in qs} == set(st.TASKS)
        for q in qs:
            assert len(set(q.choices)) == st.NUM_CHOICES, q
            assert q.choices[q.answer] == independent_answer(q) == st.solve(q.task, q.key), q
        # the right answer is not always in the same place
        assert len({q.answer for q in qs}) == st.NUM_CHOICES


def test_splits_share_no_fact_and_are_deterministic():
    train, held_out = st.questions("train", 100, seed=0), st.questions("held_out", 100, seed=0)
    for task in st.TASKS:
        keys = lambda qs, task=task: [q.key for q in qs if q.task == task]
        assert not set(keys(train)) & set(keys(held_out)), task
        assert len(set(keys(held_out))) == len(keys(held_out))  # each fact asked once
    assert st.questions("held_out", 100, seed=0) == held_out
    assert st.questions("held_out", 100, seed=1) != held_out
    # capitals: a fixed list, split ~70 / 30 by fact
    n_train = sum(q.task == "capitals" for q in train)
    n_held = sum(q.task == "capitals" for q in held_out)
    assert n_train + n_held == len(st.CAPITALS) and n_held > 5
    records = st.instruction_records(train[:5])
    assert [r["output"] for r in records] == [q.choices[q.answer] for q in train[:5]]
    assert all(r["instruction"] == q.prompt for r, q in zip(records, train, strict=False))
    with pytest.raises(ValueError, match="unknown split"):
        st.questions("test", 1)


def test_verdict_needs_the_difference_beyond_the_noise():
    from mwjax.experiments import report

    assert report.verdict(0.10, 0.02) == "agrees"
    assert report.verdict(-0.10, 0.02) == "does not agree"
    assert report.verdict(0.03, 0.02) == "inconclusive"
    s = report.summarize([0.5, 0.7], 40)
    assert math.isclose(s["sd"], math.sqrt(0.02)) and s["se"] > s["sd"] / math.sqrt(2)


@pytest.mark.slow
def test_quick_report_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.report", "--quick", f"--output_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[report " in out.stdout and "5/5 quantization" in out.stdout  # progress lines a log shows
    md = (tmp_path / "report.md").read_text()
    for heading in ("## 1. Finding", "## 2. Attacks", "## 3. Fine-tuning", "## 4. Pruning", "## 5. Quantization"):
        assert heading in md
    assert "--quick" in md and "commit" in md and "wall time" in md
    result = json.loads((tmp_path / "report.json").read_text())
    finding = result["finding"]["models"][0]
    assert finding["massive_weights"]["layer"] == 11 and finding["massive_weights"]["indices"][:2] == [1229, 1487]
    settings = result["attacks"]["settings"]
    ppl = {name: s["perplexity"] for name, s in settings.items()}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["top-5 zeroing"] > ppl["original"]
    assert all(0 <= a <= 1 for s in settings.values() for a in s["accuracy"].values())
    assert result["attacks"]["k_sweep"]["top-k zeroing"][0] == pytest.approx(ppl["original"], rel=1e-4)
    runs = result["fine_tuning"]["runs"]["lora_macdrop"]
    assert len(runs) == 1 and all(0 <= runs[0][r] <= 1 for r in ("clean", "merged", "base"))
    assert math.isfinite(runs[0]["final_train_loss"])
    pruned = result["pruning"]["settings"]
    assert {s["protect"] for s in pruned} == {"none", "massive"}
    assert all(s["removed"]["massive_rows"]["entries_pruned"] == 0 for s in pruned if s["protect"] == "massive")
    quantization = result["quantization"]
    t3 = quantization["table3"]  # --quick: no SmoothQuant row (its calibration is skipped)
    assert list(t3) == ["FP", "naive W8A8", "W8A8, super activation held out"] and t3["naive W8A8"] > t3["FP"]
    assert quantization["blocks"] == ["64", "4096"] and len(quantization["figure7"]["round-to-nearest"]) == 2
    assert set(quantization["verdicts"]["figure7_plain_degrades"].split()) <= {"agrees", "does", "not", "agree",
                                                                               "inconclusive"}
    for figure in ("bos_hidden_smollm2.png", "k_sweep.png", "fine_tuning.png", "block_sweep.png"):
        assert (tmp_path / figure).stat().st_size > 0 and f"({figure})" in md
    assert result["wall_seconds"] > 0
