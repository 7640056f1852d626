"""The zero-shot evaluation flags of experiments.zeroshot, shared by the sweeps that report mean zero-shot
accuracy as the papers' figures do (experiments.attacks' k-sweep, experiments.super_weight's scaling)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from absl import flags

from mwjax.eval import zeroshot_tasks

FLAGS = flags.FLAGS
flags.DEFINE_list("tasks", list(zeroshot_tasks.PAPER_TASKS), "lm-eval task names")
flags.DEFINE_string("data_dir", None, "run the tasks from <task>.jsonl files here instead of the hub "
                    "(experiments.zeroshot --export_data writes them)")
flags.DEFINE_integer("limit", None, "evaluate only the first N documents of each task", lower_bound=1)
flags.DEFINE_integer("zeroshot_batch_size", 8, "lm-eval requests per forward pass", lower_bound=1)
BOS_CHOICES = {"false": False, "true": True, "tokenizer": None}
flags.DEFINE_enum("add_bos_token", "false", list(BOS_CHOICES),
                  "prepend bos to every request: false (default: the papers' tables, made with lm-eval <= 0.4.9.1, "
                  "which added none for HF models), true, or tokenizer (its own default, as lm-eval >= 0.4.10 does)")
flags.DEFINE_bool("apply_chat_template", False, "render each request with the tokenizer's chat template, as lm-eval's "
                  "--apply_chat_template (instruct models; the papers' tables used none)")
flags.DEFINE_string("system_instruction", None, "system turn of the chat template (lm-eval's --system_instruction)")


SWEEP_METRICS = ("perplexity", "zeroshot")


def check_metric(name: str) -> None:
    """Check a sweep's metric: perplexity (on the first corpus) or zeroshot (mean accuracy over --tasks).

    Args:
      name: the metric's name; ValueError unless it is one of `SWEEP_METRICS`.
    """
    if name not in SWEEP_METRICS:
        raise ValueError(f"unknown sweep metric {name!r}; write perplexity, zeroshot or both (comma-separated)")


class SweepMetric(NamedTuple):
    """One metric of a sweep: the axis label, the figure / results-key suffix, the measure of an attacked
    model, the settings its results keep, and whether its axis is logarithmic."""

    label: str
    suffix: str  # "" (perplexity) or "_zeroshot"
    measure: Callable[[object], float]
    settings: dict
    log_y: bool


def sweep_metrics(names: list[str], tokenizer, evaluate: zeroshot_tasks.Evaluator | None, perplexity_label: str,
                  perplexity: Callable[[object], float], perplexity_settings: dict) -> dict[str, SweepMetric]:
    """{metric: SweepMetric} for the metrics named; with zeroshot, the bos choice is printed (`announce`).

    Args:
      names: the metrics (--sweep_metrics): "perplexity" and/or "zeroshot".
      tokenizer: the model's tokenizer, passed to `evaluate`.
      evaluate: the `evaluator()` built before the model loaded; used only for zeroshot.
      perplexity_label: the perplexity axis label (e.g. "wikitext2 perplexity").
      perplexity: attacked model -> perplexity, as the caller measures it.
      perplexity_settings: what the results JSON keeps beside the perplexity series (corpus, chunks, ...).

    Returns:
      {metric name: `SweepMetric`}, in the order perplexity, zeroshot.
    """
    metrics = {}
    if "perplexity" in names:
        metrics["perplexity"] = SweepMetric(perplexity_label, "", perplexity, perplexity_settings, True)
    if "zeroshot" in names:
        announce()
        metrics["zeroshot"] = SweepMetric("mean zero-shot accuracy (%)", "_zeroshot",
                                          lambda m: mean_accuracy(evaluate, m, tokenizer), recorded(), False)
    return metrics


def announce() -> None:
    """Print the bos choice, which changes every number (massive activations sit on the first token)."""
    paper = " (as the papers' lm-eval <= 0.4.9.1)" if BOS_CHOICES[FLAGS.add_bos_token] is False else ""
    print(f"add_bos_token={FLAGS.add_bos_token}{paper}")


def evaluator() -> zeroshot_tasks.Evaluator:
    """The --tasks as the flags say; call it on each model to evaluate (`zeroshot_tasks.Evaluator`). Unknown
    tasks or missing local files fail here: build it before the model loads."""
    return zeroshot_tasks.Evaluator(FLAGS.tasks, data_dir=FLAGS.data_dir, limit=FLAGS.limit,
                                    batch_size=FLAGS.zeroshot_batch_size,
                                    add_bos_token=BOS_CHOICES[FLAGS.add_bos_token],
                                    apply_chat_template=FLAGS.apply_chat_template,
                                    system_instruction=FLAGS.system_instruction)


def mean_accuracy(evaluate: zeroshot_tasks.Evaluator, model, tokenizer) -> float:
    """The papers' figure metric: the mean over the tasks of acc_norm where a task has it, else acc (%).

    Args:
      evaluate: the `evaluator()` of the --tasks.
      model: the (attacked) mwjax model.
      tokenizer: its tokenizer.

    Returns:
      The mean accuracy, in percent.
    """
    return evaluate(model, tokenizer)[0]["mean"]["acc_norm"]


def recorded() -> dict:
    """The settings a results JSON keeps beside zero-shot numbers."""
    return {"tasks": FLAGS.tasks, "add_bos_token": FLAGS.add_bos_token, "limit": FLAGS.limit,
            "data_dir": FLAGS.data_dir, "apply_chat_template": FLAGS.apply_chat_template,
            "system_instruction": FLAGS.system_instruction}
