"""Zero-shot accuracy on House of Cards' five tasks through lm-evaluation-harness (Tables 1, 2, 7, 8).

    python -m experiments.zeroshot --model=PATH [--adapter=runs/NAME/adapter] [--attack=zero_top_k:3] \\
        [--attack_on=merged|base] [--label="LoRA + MacDrop"]
    python -m experiments.zeroshot --export_data=DIR          # where the hub is reachable: save the five tasks
    python -m experiments.zeroshot --model=PATH --data_dir=DIR   # then, anywhere: run them from those files
    python -m experiments.zeroshot --data_dir=DIR --write_tasks=INC   # task configs for lm_eval --include_path

Writes zeroshot.json (acc and acc_norm per task, and their means) and zeroshot.md (a Table 2 / 7 row)
under --output_dir; `experiments.tables` assembles the papers' tables from such runs.
"""

from __future__ import annotations

from absl import app, flags

from mwjax.core import cli
from mwjax.eval import zeroshot_tasks
from mwjax.experiments import attack_flags, common, zeroshot_flags

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(zeroshot_flags)
flags.adopt_module_key_flags(attack_flags)
flags.DEFINE_string("export_data", None, "download the tasks' evaluation splits into this directory and exit")
flags.DEFINE_string("write_tasks", None, "write task configs reading --data_dir's files into this directory (for "
                    "`lm_eval --include_path=DIR --tasks=arc_easy_local,...`) and exit")
flags.DEFINE_alias("batch_size", "zeroshot_batch_size")

TASK_TITLES = zeroshot_tasks.TITLES


def table_row(label: str, scores: dict) -> list:
    """One Table 2 / 7 row: the label, each task's acc_norm (acc where it has none), then their mean.

    Args:
      label: the method's label (--label).
      scores: {task: {"acc": %, "acc_norm": %}, "mean": ...} (`zeroshot_tasks.task_scores`).

    Returns:
      [label, one score per task in `scores`' order, the mean].
    """
    return [label] + [scores[t].get("acc_norm", scores[t]["acc"]) for t in scores if t != "mean"] + [
        scores["mean"]["acc_norm"]]


def main(argv):
    """Export the tasks' data (--export_data), write lm-eval task configs (--write_tasks), or evaluate --model.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    if FLAGS.export_data:
        for task, path in zeroshot_tasks.export_task_data(FLAGS.export_data, FLAGS.tasks).items():
            print(f"{task}: {path}")
        return
    if FLAGS.write_tasks:
        if not FLAGS.data_dir:
            raise app.UsageError("--write_tasks needs --data_dir (the <task>.jsonl files the configs read)")
        names = zeroshot_tasks.write_local_tasks(FLAGS.data_dir, FLAGS.write_tasks, FLAGS.tasks)
        print(f"mwjax-lm-eval --model mwjax --model_args pretrained=PATH --include_path={FLAGS.write_tasks} "
              f"--tasks={','.join(names)}")
        return
    out = common.output_dir("outputs/zeroshot")  # unwritable, unknown tasks, missing files: fail before the model
    evaluate = zeroshot_flags.evaluator()
    model, tokenizer = attack_flags.load_model()
    zeroshot_flags.announce()
    scores, _ = evaluate(model, tokenizer)
    run = attack_flags.recorded()
    label = run["label"]
    header = ["method"] + [TASK_TITLES.get(t, t) for t in scores if t != "mean"] + ["Avg."]
    table = common.markdown_table(header, [table_row(label, scores)])
    print(f"{FLAGS.model} (acc_norm where the task has it, else acc):\n{table}")
    (out / "zeroshot.md").write_text(table + "\n")
    payload = {**run, **zeroshot_flags.recorded(), "scores": scores}
    common.write_json(out / "zeroshot.json", payload)
    print(f"wrote zeroshot.json and zeroshot.md in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
