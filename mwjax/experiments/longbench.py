"""Long-context performance on LongBench's 16 English datasets through lm-eval (House of Cards Table 9).

    python -m experiments.longbench --model=PATH [--adapter=runs/NAME/adapter] [--attack=zero_top_k:3] \\
        [--label="LoRA + MacDrop"]
    python -m experiments.longbench --export_data=DIR         # where the hub is reachable: save the datasets
    python -m experiments.longbench --model=PATH --data_dir=DIR  # then, anywhere: run them from those files

The paper's setting: prompts over --max_length=7500 tokens cut in the middle as LongBench does, the
tokenizer's chat template where LongBench applies one (`mwjax.eval.longbench` says where, and what it
keeps of LongBench's protocol). --data_dir holds <dataset>.jsonl in LongBench's record format (its
release's data.zip, or --export_data's files). From the shell, lm-eval runs the same requests with
`mwjax-lm-eval --model mwjax --model_args pretrained=PATH,truncation=middle,max_prompt_length=7500
--tasks longbench_qasper`.

Writes longbench.json (score per dataset, their mean, the first generations of each), longbench.md (a
Table 9 row) and longbench.png (score per dataset) under --output_dir; `experiments.tables` assembles
Table 9 from such runs. Needs `pip install jieba fuzzywuzzy rouge` (lm-eval's LongBench metrics).
"""

from __future__ import annotations

from absl import flags

from mwjax.core import atomic, cli
from mwjax.eval import longbench
from mwjax.experiments import attack_flags, common, plots, tables

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(attack_flags)
flags.DEFINE_list("datasets", list(longbench.DATASETS), "LongBench datasets (Table 9's 16 English ones by default)")
common.check_flag("datasets", lambda name: longbench.check_datasets([name]))
flags.DEFINE_string("data_dir", None, "run the datasets from <dataset>.jsonl files here (LongBench's record format) "
                    "instead of the hub")
flags.DEFINE_string("export_data", None, "download the datasets' test splits into this directory and exit")
flags.DEFINE_integer("limit", None, "evaluate only the first N documents of each dataset", lower_bound=1)
flags.DEFINE_integer("max_length", longbench.MAX_LENGTH, "prompts over this many tokens lose their middle "
                     "(House of Cards Appendix H: 7,500)", lower_bound=2)
flags.DEFINE_integer("max_gen_toks", None, "generate at most this many tokens on every dataset instead of each "
                     "one's own length (LongBench's, up to 512): quick checks, not the paper's protocol",
                     lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "generation requests per batch", lower_bound=1)
flags.DEFINE_bool("chat_template", True, "wrap the prompts of the datasets LongBench wraps in the tokenizer's chat "
                  "template (when it has one)")
BOS_CHOICES = {"false": False, "true": True, "tokenizer": None}
flags.DEFINE_enum("add_bos_token", "tokenizer", list(BOS_CHOICES), "prepend bos to every prompt: tokenizer (its own "
                  "default, as LongBench's pred.py tokenizes), true or false")


def main(argv):
    """Export the datasets (--export_data), or run LongBench on --model and write Table 9's row.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    if FLAGS.export_data:
        for name, path in longbench.export_task_data(FLAGS.export_data, FLAGS.datasets).items():
            print(f"{name}: {path}")
        return
    out = common.output_dir("outputs/longbench")  # unwritable, missing files: fail before the model loads
    longbench.check_datasets(FLAGS.datasets, FLAGS.data_dir)
    evaluate = longbench.Evaluator(FLAGS.datasets, data_dir=FLAGS.data_dir, limit=FLAGS.limit,
                                   batch_size=FLAGS.batch_size, max_length=FLAGS.max_length,
                                   chat_template=FLAGS.chat_template, add_bos_token=BOS_CHOICES[FLAGS.add_bos_token],
                                   max_gen_toks=FLAGS.max_gen_toks)
    model, tokenizer = attack_flags.load_model()
    templated = evaluate.templated(tokenizer)
    print(f"max_length={FLAGS.max_length} (middle truncation), add_bos_token={FLAGS.add_bos_token}, chat template on: "
          f"{', '.join(templated) or 'none'}")
    scores, raw = evaluate(model, tokenizer)
    run = attack_flags.recorded() | {
        "datasets": FLAGS.datasets, "limit": FLAGS.limit, "data_dir": FLAGS.data_dir, "max_length": FLAGS.max_length,
        "max_gen_toks": FLAGS.max_gen_toks, "add_bos_token": FLAGS.add_bos_token, "chat_template": templated,
        "scores": scores,
        "predictions": longbench.predictions(raw["samples"], evaluate.tasks)}
    table = tables.table9([run])
    if departure := tables.longbench_departure(run):
        table += f"\n\n* not the paper's protocol: {departure}"
    print(f"{FLAGS.model} (LongBench score, %):\n{table}")
    atomic.write_text_atomically(out / "longbench.md", table + "\n")
    plots.category_bars({longbench.TITLES[d]: scores[d] for d in FLAGS.datasets},
                        {c: [longbench.TITLES[d] for d in ds] for c, ds in longbench.CATEGORIES.items()},
                        f"{common.model_name()} ({run['label']}): LongBench", common.figure(out, "longbench"))
    common.write_json(out / "longbench.json", run)
    print(f"wrote longbench.json, longbench.md and the figure in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
