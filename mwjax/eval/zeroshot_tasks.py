"""The five zero-shot tasks of House of Cards, and how to run them from local files.

lm-evaluation-harness reads these datasets from the hub. For a machine that has the data but not
the hub: `export_task_data(dir)` (run where the hub is reachable) writes each task's evaluation
split as JSON lines, `write_local_tasks(dir, include_dir)` writes task configs that `include:`
lm-eval's own config of each task (same prompts, same WinoGrande partial scoring, same metrics)
with `dataset_path: json` pointed at those files. Pass `include_dir` as lm-eval's
`--include_path` (or `TaskManager(include_path=...)`) and run the tasks as `<task>_local`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    """Where one of the paper's zero-shot tasks lives: lm-eval's config of it and its hub dataset and split."""

    name: str
    config: str  # path of lm-eval's task config, relative to lm_eval/tasks
    hub: tuple[str, str | None]  # (dataset path, config name) on the hub
    split: str  # the split lm-eval evaluates
    split_key: str  # the config key naming that split


TASKS = {
    "arc_easy": ZeroShotTask("arc_easy", "arc/arc_easy.yaml", ("allenai/ai2_arc", "ARC-Easy"), "test", "test_split"),
    "arc_challenge": ZeroShotTask("arc_challenge", "arc/arc_challenge.yaml", ("allenai/ai2_arc", "ARC-Challenge"),
                                  "test", "test_split"),
    "boolq": ZeroShotTask("boolq", "super_glue/boolq/default.yaml", ("aps/super_glue", "boolq"), "validation",
                          "validation_split"),
    "piqa": ZeroShotTask("piqa", "piqa/piqa.yaml", ("baber/piqa", None), "validation", "validation_split"),
    "winogrande": ZeroShotTask("winogrande", "winogrande/default.yaml", ("allenai/winogrande", "winogrande_xl"),
                               "validation", "validation_split"),
}
PAPER_TASKS = tuple(TASKS)
TITLES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "boolq": "BoolQ", "piqa": "PIQA",
          "winogrande": "WinoGrande"}  # the papers' column titles
LOCAL_SUFFIX = "_local"


def lm_eval_tasks_dir() -> Path:
    """The `lm_eval/tasks` directory of the installed lm-eval (its task configs)."""
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def export_task_data(out_dir: str | os.PathLike, tasks=PAPER_TASKS) -> dict[str, Path]:
    """Download each task's evaluation split from the hub into `out_dir/<task>.jsonl`.

    Args:
      out_dir: the directory written (created when missing).
      tasks: the tasks to export (keys of TASKS).

    Returns:
      {task: the file written}.
    """
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in tasks:
        task = TASKS[name]
        data = datasets.load_dataset(task.hub[0], task.hub[1], split=task.split)
        written[name] = out / f"{name}.jsonl"
        data.to_json(str(written[name]), lines=True)
    return written


def check_tasks(tasks, data_dir: str | os.PathLike | None = None, manager=None) -> None:
    """Raise unless every task can run.

    Cheap next to loading a model, so command lines check first (building their `Evaluator` before the model).

    Args:
      tasks: the task names.
      data_dir: with it, every task must be one of TASKS with its <task>.jsonl there; without, a task lm-eval
        knows.
      manager: an lm-eval `TaskManager` already built (used without `data_dir`); None builds one.

    Raises:
      ValueError: for a task lm-eval does not know, or one without a local form.
      FileNotFoundError: for a task file missing from `data_dir`.
    """
    if data_dir is None:
        from lm_eval.tasks import TaskManager

        unknown = sorted(set(tasks) - set((manager or TaskManager()).all_tasks))
        if unknown:
            raise ValueError(f"lm-eval knows no task {unknown[0]!r} (of {list(tasks)})")
        return
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"task {name!r} has no local form: --data_dir runs {sorted(TASKS)}")
        data = Path(data_dir) / f"{name}.jsonl"
        if not data.is_file():
            raise FileNotFoundError(f"{data} is missing: export it where the hub is reachable with experiments."
                                    "zeroshot --export_data=DIR (or mwjax.eval.zeroshot_tasks.export_task_data)")


def write_local_tasks(data_dir: str | os.PathLike, include_dir: str | os.PathLike, tasks=PAPER_TASKS) -> list[str]:
    """Task configs reading `data_dir/<task>.jsonl`, each `include:`ing lm-eval's own config of the task.

    Args:
      data_dir: the directory of `<task>.jsonl` files (`export_task_data`).
      include_dir: where the configs are written; pass it as lm-eval's --include_path.
      tasks: the tasks (keys of TASKS).

    Returns:
      The local task names (`<task>_local`).
    """
    check_tasks(tasks, data_dir)
    data_dir, include_dir = Path(data_dir).absolute(), Path(include_dir)
    include_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for name in tasks:
        task = TASKS[name]
        data = data_dir / f"{name}.jsonl"
        splits = {"training_split": None, "validation_split": None, "test_split": None, task.split_key: task.split}
        lines = [f"include: {lm_eval_tasks_dir() / task.config}", f"task: {name}{LOCAL_SUFFIX}", "tag: []",
                 "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                 f"    {task.split}: {data}"]
        lines += [f"{key}: {value if value else 'null'}" for key, value in splits.items()]
        (include_dir / f"{name}{LOCAL_SUFFIX}.yaml").write_text("\n".join(lines) + "\n")
        names.append(name + LOCAL_SUFFIX)
    return names


def task_scores(results: dict, tasks) -> dict[str, dict[str, float]]:
    """Each task's accuracies in % from lm-eval's results (local names mapped back), and their means.

    Args:
      results: lm-eval's output, with {"results": {task: {"acc,none": ..., "acc_norm,none": ...}}}.
      tasks: the task names run (`<task>_local` ones included).

    Returns:
      {task: {"acc": %, "acc_norm": %}} plus "mean": the mean acc, and the mean of acc_norm where a task has it
      (ARC, PIQA) and acc where not (BoolQ, WinoGrande).
    """
    scores = {}
    for name in tasks:
        base = name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else name
        r = results["results"][name]
        scores[base] = {m: 100.0 * r[f"{m},none"] for m in ("acc", "acc_norm") if f"{m},none" in r}
    per_task = list(scores.values())
    scores["mean"] = {"acc": float(np.mean([s["acc"] for s in per_task])),
                      "acc_norm": float(np.mean([s.get("acc_norm", s["acc"]) for s in per_task]))}
    return scores


class Evaluator:
    """Runs `tasks` zero-shot through lm-eval on in-memory models.

    `evaluator(model, tokenizer)` -> (task_scores, lm-eval's raw results). The task setup (lm-eval indexes its
    ~10k task configs in ~10 s) happens once, so a sweep pays it once. Unknown tasks or missing files raise
    here, so build it before loading a model.

    Args:
      tasks: the task names (PAPER_TASKS, or any lm-eval knows when there is no `data_dir`).
      data_dir: read the <task>.jsonl files here (`write_local_tasks`); None for the hub.
      limit: lm-eval's limit: at most this many samples per task; None for all.
      batch_size: the `MwjaxLM` batch size.
      add_bos_token: `MwjaxLM`'s add_bos_token; None for the tokenizer's default.
      apply_chat_template: lm-eval's --apply_chat_template (instruct models; the papers used none).
      system_instruction: lm-eval's --system_instruction; None for none.
    """

    def __init__(self, tasks=PAPER_TASKS, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                 batch_size: int = 8, add_bos_token: bool | None = None, apply_chat_template: bool = False,
                 system_instruction: str | None = None):
        from lm_eval.tasks import TaskManager

        self.limit, self.batch_size, self.add_bos_token = limit, batch_size, add_bos_token
        # lm-eval's --apply_chat_template / --system_instruction (instruct models; the papers used neither)
        self.chat = {"apply_chat_template": apply_chat_template, "system_instruction": system_instruction}
        self._include = tempfile.TemporaryDirectory() if data_dir else None  # removed with the evaluator
        self.tasks = write_local_tasks(data_dir, self._include.name, tasks) if data_dir else list(tasks)
        self.manager = TaskManager(include_path=self._include.name if data_dir else None)
        if not data_dir:
            check_tasks(self.tasks, manager=self.manager)

    def __call__(self, model, tokenizer) -> tuple[dict, dict]:
        import lm_eval

        from mwjax.eval.lm_eval import MwjaxLM

        lm = MwjaxLM(model, tokenizer, batch_size=self.batch_size, add_bos_token=self.add_bos_token)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(self.tasks), task_manager=self.manager,
                                          limit=self.limit, num_fewshot=0, **self.chat)
        return task_scores(results, self.tasks), results


def evaluate(model, tokenizer, tasks=PAPER_TASKS, **options) -> tuple[dict, dict]:
    """(task_scores, lm-eval's raw results) of one model: `Evaluator(tasks, **options)(model, tokenizer)`.

    Args:
      model: an mwjax causal LM.
      tokenizer: its HF tokenizer.
      tasks: the tasks to run.
      options: `Evaluator`'s keyword arguments (data_dir, limit, batch_size, add_bos_token, ...).

    Returns:
      (`task_scores`, lm-eval's `simple_evaluate` output).
    """
    return Evaluator(tasks, **options)(model, tokenizer)
