"""House of Cards' generation tasks (Section 4.2, Table 3): an assistant answers Spec-Bench's questions
(`mwjax.eval.spec_bench.answer`), an LLM judge grades every answer through prometheus-eval
(`mwjax.eval.judge.grade`), and the scores become Table 3's columns.

    answers = spec_bench.answer(model, tokenizer, questions)
    records, summary = judge_answers(judge_model, judge_tokenizer, questions, answers)
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx

from mwjax.eval import judge, spec_bench


def judge_answers(judge_model: nnx.Module, judge_tokenizer, questions: Sequence[spec_bench.Question],
                  answers: Sequence[Sequence[str]], **grade_kwargs) -> tuple[list[dict], dict]:
    """Grade every turn's answer with the LLM judge, and Table 3's scores from the grades.

    Args:
      judge_model: the judge, an mwjax causal LM (House of Cards: Prometheus-2-7B).
      judge_tokenizer: its HF tokenizer.
      questions: the Spec-Bench questions answered.
      answers: the assistant's answers, [question][turn] (`spec_bench.answer`).
      grade_kwargs: `judge.grade`'s keyword arguments (rubric, params, max_retries, ...).

    Returns:
      The per-question records (turns, references, answers, and per turn: its Table 3 column, score, feedback,
      retries and every judge output) and the summary: {"scores": spec_bench.table3's means, "counts": per
      column, the turns judged, those whose first output did not parse, the retries made and those never parsed
      (left out of the means)}.
    """
    turns = [(qi, t) for qi, q in enumerate(questions) for t in range(len(q.turns))]
    items = [judge.Item(spec_bench.instruction(questions[qi], answers[qi], t), answers[qi][t],
                        spec_bench.reference(questions[qi], t)) for qi, t in turns]
    judgements = judge.grade(judge_model, judge_tokenizer, items, **grade_kwargs)
    per_question: list[list[judge.Judgement]] = [[] for _ in questions]
    counts: dict[str, dict[str, int]] = {}
    for (qi, t), j in zip(turns, judgements, strict=True):
        per_question[qi].append(j)
        c = counts.setdefault(questions[qi].column(t), {"judged": 0, "unparsed_first": 0, "retries": 0, "failed": 0})
        c["judged"] += 1
        c["unparsed_first"] += int(j.retries > 0)
        c["retries"] += j.retries
        c["failed"] += int(j.score is None)
    records = [{"question_id": q.question_id, "category": q.category, "subtask": q.subtask, "turns": list(q.turns),
                "reference": list(q.reference) if q.reference else None, "answers": list(answers[qi]),
                "judgements": [{"column": q.column(t), "score": j.score, "feedback": j.feedback,
                                "retries": j.retries, "outputs": list(j.outputs)}
                               for t, j in enumerate(per_question[qi])]}
               for qi, q in enumerate(questions)]
    scores = spec_bench.table3(questions, [[j.score for j in js] for js in per_question])
    return records, {"scores": scores, "counts": {c: counts[c] for c in spec_bench.COLUMNS if c in counts}}

