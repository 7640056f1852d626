"""House of Cards Table 3: generation tasks (Spec-Bench's six subtasks) judged by Prometheus-2-7B.

    python -m experiments.generation --model=PATH [--adapter=DIR] [--attack=zero_top_k:3] --label="LoRA + MacDrop" \\
        --questions=question.jsonl [--judge=prometheus-eval/prometheus-7b-v2.0]

The assistant (--model, with --adapter / --attack as experiments.zeroshot) answers every question through its
chat template (greedy, the second MT-bench turn after its own first answer; mwjax.eval.spec_bench); then the
judge, any model mwjax loads, grades every answer on a 1-5 scale with prometheus-eval's absolute-grading
prompt, --rubric and parser, re-sampling unparseable judgements as prometheus-eval does (mwjax.eval.judge).
House of Cards' Appendix I judgement uses the helpfulness rubric's wording with a reference answer; the paper
says nothing more, so every subtask is graded on --rubric=helpfulness, with the question's reference answer
where Spec-Bench gives one.

Writes under --output_dir: generation.jsonl (per question: turns, answers, each judgement with its score,
feedback and every judge output), generation.json (the Table 3 scores, unparseable counts and settings),
generation.md (a Table 3 row) and generation.png (the row as bars); `experiments.tables` assembles Table 3
from such runs. --questions=hub downloads Spec-Bench's question.jsonl from its GitHub repository.
"""

from __future__ import annotations

import json
import time

from absl import flags

from mwjax import converters
from mwjax.core import atomic, cli, lazy
from mwjax.eval import judge, spec_bench
from mwjax.experiments import attack_flags, common, plots

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
jnp = lazy.module("jax.numpy")
generation_tasks = lazy.module("mwjax.eval.generation_tasks")

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)  # --help lists the shared flags (--model, --output_dir, ...) too
flags.adopt_module_key_flags(attack_flags)  # --attack, --attack_on, --label
flags.DEFINE_string("questions", "hub", "Spec-Bench's question.jsonl: a local path, or 'hub' (its GitHub repository)")
flags.DEFINE_list("subtasks", list(spec_bench.SUBTASKS), "Spec-Bench subtasks to run")
flags.DEFINE_integer("per_subtask", None, "only the first N questions of each subtask (Spec-Bench has 80)",
                     lower_bound=1)
flags.DEFINE_integer("max_new_tokens", 1024, "assistant tokens per turn (FastChat / Spec-Bench's default)",
                     lower_bound=1)
cli.define_float("temperature", 0.0, "assistant sampling temperature (0: greedy, Spec-Bench's baseline)",
                    lower_bound=0)
flags.DEFINE_integer("batch_size", 8, "prompts per generation batch (assistant and judge)", lower_bound=1)
flags.DEFINE_integer("seed", 0, "sampling seed (the judge samples as prometheus-eval does)", lower_bound=0)
flags.DEFINE_string("judge", spec_bench.PAPER_JUDGE, "the judge: anything mwjax loads (HF dir, .gguf, embedded:<name>, "
                    "hub id); Prometheus-2-7B by default, as the paper")
flags.DEFINE_enum("judge_prompt", "prometheus", list(judge.PROMPT_FORMATS), "the judge's prompt format: prometheus "
                  "(prometheus-eval's vLLM path, for Prometheus-2) or chat_template (the judge tokenizer's)")
flags.DEFINE_enum("rubric", "helpfulness", list(judge.RUBRICS), "prometheus-eval's score rubric")
flags.DEFINE_integer("judge_max_new_tokens", judge.PROMETHEUS_PARAMS["max_tokens"], "judge tokens per judgement",
                     lower_bound=1)
cli.define_float("judge_temperature", judge.PROMETHEUS_PARAMS["temperature"], "judge temperature (prometheus-eval's"
                    "; 0 is greedy, whose retries repeat the same unparseable output)", lower_bound=0)
cli.define_float("judge_top_p", judge.PROMETHEUS_PARAMS["top_p"], "judge nucleus", above=0, upper_bound=1)
cli.define_float("judge_repetition_penalty", judge.PROMETHEUS_PARAMS["repetition_penalty"],
                    "judge repetition penalty", above=0)
flags.DEFINE_integer("judge_max_retries", judge.MAX_RETRIES, "re-generations of unparseable judgements",
                     lower_bound=0)


def judge_params() -> dict:
    """The judge's sampling parameters from the --judge_* flags, as prometheus-eval's params dict names them."""
    return {"max_tokens": FLAGS.judge_max_new_tokens, "temperature": FLAGS.judge_temperature,
            "top_p": FLAGS.judge_top_p, "repetition_penalty": FLAGS.judge_repetition_penalty}




def main(argv):
    """Answer the Spec-Bench questions with --model, have --judge grade the answers, write Table 3's row.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/generation")
    questions = spec_bench.read_questions(FLAGS.questions, per_subtask=FLAGS.per_subtask, subtasks=FLAGS.subtasks)
    print(f"{len(questions)} Spec-Bench questions from {FLAGS.questions}")
    start = time.monotonic()
    model, tokenizer = attack_flags.load_model()
    answers = spec_bench.answer(model, tokenizer, questions, FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
                                temperature=FLAGS.temperature, seed=FLAGS.seed)
    if FLAGS.judge == FLAGS.model and not FLAGS.adapter and not FLAGS.attack:  # judging itself: loaded once
        judge_model, judge_tokenizer = model, tokenizer
    else:
        del model  # one model in memory at a time: the assistant goes before the judge loads
        judge_model, judge_tokenizer = converters.load(FLAGS.judge, dtype=jnp.dtype(FLAGS.dtype))
    records, summary = generation_tasks.judge_answers(
        judge_model, judge_tokenizer, questions, answers, rubric=FLAGS.rubric, params=judge_params(),
        max_retries=FLAGS.judge_max_retries, prompt_format=FLAGS.judge_prompt, batch_size=FLAGS.batch_size,
        seed=FLAGS.seed)
    run = attack_flags.recorded()
    label = run["label"]
    table = common.markdown_table(["method"] + spec_bench.TABLE3_HEADER,
                                  [[label] + spec_bench.table3_row(summary["scores"])])
    failed = sum(c["failed"] for c in summary["counts"].values())
    print(f"{FLAGS.model} judged by {FLAGS.judge} ({FLAGS.rubric} rubric; {failed} judgement(s) never parsed, "
          f"left out of the means):\n{table}")
    payload = {**run, "judge": FLAGS.judge, "judge_prompt": FLAGS.judge_prompt, "rubric": FLAGS.rubric,
               "judge_params": judge_params(), "judge_max_retries": FLAGS.judge_max_retries,
               "questions": FLAGS.questions, "subtasks": FLAGS.subtasks, "per_subtask": FLAGS.per_subtask,
               "max_new_tokens": FLAGS.max_new_tokens, "temperature": FLAGS.temperature, "seed": FLAGS.seed,
               "dtype": FLAGS.dtype, "wall_s": round(time.monotonic() - start, 1), **summary}
    atomic.write_text_atomically(out / "generation.jsonl",
                                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic.write_text_atomically(out / "generation.json", json.dumps(payload, indent=2))
    atomic.write_text_atomically(out / "generation.md", table + "\n")
    scores = summary["scores"]
    if scores["avg"] is None:
        print(f"wrote generation.jsonl, generation.json and generation.md in {common.publish(out)} (no figure: no "
              "judgement parsed)")
        return
    bars = {spec_bench.COLUMNS[c]: scores[c] for c in spec_bench.COLUMNS if c in scores} | {"Avg.": scores["avg"]}
    figure = plots.likert_bars(bars, f"{common.model_name()} ({label}), judge "
                               f"{FLAGS.judge.rstrip('/').split('/')[-1]}", common.figure(out, "generation"))
    print(f"wrote generation.jsonl, generation.json, generation.md and {figure.name} in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
