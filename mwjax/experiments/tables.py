"""Assemble House of Cards' result tables from the runs' JSON outputs.

    python -m experiments.tables --runs=outputs/ [--output_dir=outputs/tables]

Reads every attacks.json (experiments.attacks), zeroshot.json (experiments.zeroshot), generation.json
(experiments.generation), longbench.json (experiments.longbench) and quantize.json (experiments.quantize) under
--runs and writes tables.md with
  Table 1: perplexity per corpus and mean zero-shot accuracy of the original model, top-k zeroing
           and top-k retaining (zero-shot runs matched by their --attack: none, zero_top_k:K,
           retain_top_k:K);
  Table 2: zero-shot accuracy per task and mean for every unattacked run, one row per --label
           (e.g. "LoRA", "LoRA + MacDrop");
  Table 8: the mean zero-shot accuracy of each label after top-3 zeroing (runs with
           --attack=zero_top_k:3), beside its unattacked mean, with the reading of each attacked
           fine-tuned run (--attack_on: merged or base);
  Table 3: the judge's mean 1-5 score per generation task (MT-1, MT-2, translation, summarization, QA,
           math reasoning, RAG) and their mean, one row per --label (an attacked run shows its attack);
           a run on fewer questions or subtasks or with another judge than Prometheus-2-7B carries a "*",
           and judgements that never parsed (left out of the means) are counted;
  Table 9: LongBench's 16 English datasets and their mean, one row per long-context run;
  The Super Weight's Table 3 (W8A8: unquantized, naive, SmoothQuant, the super activation held out; perplexity
           per corpus with the share of SmoothQuant's gain) and Figure 7 (INT4 perplexity / zero-shot accuracy per
           block size and curve), one of each per quantize run.
Accuracies are acc_norm where the task has it, else acc (mwjax.eval.zeroshot_tasks.task_scores).
A zero-shot run made with --limit, on a subset of the five tasks or with --apply_chat_template is not
the papers' protocol: its numbers carry a "*" and the tables say which runs and why; so does a LongBench
run made with --limit, on a subset of the datasets, with another --max_length than 7,500 or --max_gen_toks.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from mwjax.core import cli
from mwjax.eval import longbench, spec_bench
from mwjax.eval.zeroshot_tasks import PAPER_TASKS
from mwjax.eval.zeroshot_tasks import TITLES as TASK_TITLES
from mwjax.experiments import common
from mwjax.research import defaults

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.DEFINE_string("runs", "outputs", "directory searched (recursively) for attacks.json, zeroshot.json and "
                    "generation.json and longbench.json")


def load_runs(root: Path, name: str) -> list[dict]:
    """Every <name>.json under root, each with the path it came from.

    Hidden directories (the staging and swap directories of runs being written, `mwjax.core.atomic`) are not
    searched.

    Args:
      root: the directory searched recursively (--runs).
      name: the files' stem: "attacks", "zeroshot", "generation" or "longbench".

    Returns:
      One dict per file, in path order: its JSON and "path", the file's path as a string.
    """
    paths = [p for p in sorted(root.rglob(f"{name}.json"))
             if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return [json.loads(p.read_text()) | {"path": str(p)} for p in paths]


def departure(run: dict) -> str | None:
    """How a zero-shot run departs from the papers' protocol (all five tasks, every document), or None.

    Args:
      run: a zeroshot.json record (`experiments.zeroshot`): its "scores" per task and "mean", "limit",
        "apply_chat_template".

    Returns:
      The departures joined by ", " (--limit, the number of tasks, --apply_chat_template), or None.
    """
    tasks = [t for t in run["scores"] if t != "mean"]
    parts = [f"--limit={run['limit']}"] if run.get("limit") else []
    if sorted(tasks) != sorted(PAPER_TASKS):
        parts.append(f"{len(tasks)} of the {len(PAPER_TASKS)} tasks")
    if run.get("apply_chat_template"):
        parts.append("--apply_chat_template")
    return ", ".join(parts) or None


def _mean(run: dict) -> float | str:
    mean = run["scores"]["mean"]["acc_norm"]
    return f"{mean:.2f}*" if departure(run) else mean


def departures_note(zeroshot: list[dict]) -> str | None:
    """The note that names each zero-shot run off the papers' protocol (its numbers carry a "*") and why.

    Args:
      zeroshot: the zeroshot.json records (`load_runs`).

    Returns:
      The note, or None when every run follows the protocol.
    """
    marked = [f"{z['path']} ({departure(z)})" for z in zeroshot if departure(z)]
    return ("* not the papers' protocol, so not comparable with their tables: " + "; ".join(marked)) if marked else None


def table1(attack_run: dict, zeroshot: list[dict]) -> str:
    """House of Cards Table 1 for one attacks.json: perplexity per corpus and mean zero-shot accuracy.

    One row each for the original model, top-k zeroing and top-k retaining; the mean zero-shot accuracy is that of
    the zero-shot run of the same --model with no --attack, zero_top_k:K or retain_top_k:K ("-" where none is).

    Args:
      attack_run: an attacks.json record (`experiments.attacks`): "model", "k" and each setting's perplexities.
      zeroshot: the zeroshot.json records (`load_runs`).

    Returns:
      The table in Markdown.
    """
    k = attack_run["k"]
    spec = {"original": None, f"top-{k} zeroing": f"zero_top_k:{k}", f"top-{k} retaining": f"retain_top_k:{k}"}
    by_attack = {z["attack"]: z for z in zeroshot if z["model"] == attack_run["model"]}
    corpora = list(next(iter(attack_run["settings"].values()))["perplexity"])
    rows = []
    for setting, attack in spec.items():
        ppl = attack_run["settings"][setting]["perplexity"]
        zs = by_attack.get(attack)
        rows.append([setting] + [ppl[c]["perplexity"] for c in corpora] + [_mean(zs) if zs else "-"])
    return common.markdown_table(["attack"] + [f"{c} PPL" for c in corpora] + ["mean zero-shot"], rows)


def table2(zeroshot: list[dict]) -> str:
    """House of Cards Table 2: zero-shot accuracy per task and their mean, one row per unattacked run.

    Accuracy is acc_norm where the task has it, else acc; the columns are the tasks every unattacked run has; a run
    off the papers' protocol carries a "*" (`departure`).

    Args:
      zeroshot: the zeroshot.json records (`load_runs`); the attacked ones are left out.

    Returns:
      The table in Markdown.
    """
    runs = [z for z in zeroshot if not z["attack"]]
    tasks = [t for t in TASK_TITLES if all(t in z["scores"] for z in runs)]
    rows = [[z["model"], z["label"] + ("*" if departure(z) else "")]
            + [z["scores"][t].get("acc_norm", z["scores"][t]["acc"]) for t in tasks] + [_mean(z)] for z in runs]
    return common.markdown_table(["model", "method"] + [TASK_TITLES[t] for t in tasks] + ["Avg."], rows)


def table8(zeroshot: list[dict], attack: str = "zero_top_k:3") -> str:
    """House of Cards Table 8: each run's mean zero-shot accuracy under `attack`, beside its unattacked mean.

    The unattacked run is the one with the same model and --label; the attacked run's reading of a fine-tuned model
    (--attack_on: merged or base) is a column.

    Args:
      zeroshot: the zeroshot.json records (`load_runs`).
      attack: the attack of the rows, as --attack spells it (Table 8: top-3 zeroing).

    Returns:
      The table in Markdown.
    """
    clean = {(z["model"], z["label"]): z for z in zeroshot if not z["attack"]}
    rows = []
    for z in zeroshot:
        if z["attack"] == attack:
            base = clean.get((z["model"], z["label"]))
            rows.append([z["model"], z["label"], z.get("attack_on") or "-", _mean(base) if base else "-", _mean(z)])
    return common.markdown_table(["model", "method", "attack on", "mean zero-shot", f"after {attack}"], rows)


def bos_note(zeroshot: list[dict]) -> str:
    """Which bos choice (add_bos_token) the zero-shot runs made.

    Massive activations sit on the first token, so runs with different choices are not comparable.

    Args:
      zeroshot: the zeroshot.json records (`load_runs`).

    Returns:
      One line: the choice they share, or a WARNING that lists each run's choice.
    """
    choices = {z["path"]: str(z.get("add_bos_token")) for z in zeroshot}
    if len(set(choices.values())) == 1:
        return f"Zero-shot runs: add_bos_token={next(iter(choices.values()))}."
    return "WARNING: the zero-shot runs mix add_bos_token choices, their numbers are not comparable: " + ", ".join(
        f"{path}: {choice}" for path, choice in choices.items())


def generation_departure(run: dict) -> str | None:
    """How a generation run departs from Table 3's protocol (80 questions of each of the six Spec-Bench
    subtasks, judged by Prometheus-2-7B), or None.

    Args:
      run: a generation.json record (`experiments.generation`): "per_subtask", "subtasks", "judge".

    Returns:
      The departures joined by ", " (--per_subtask, the number of subtasks, the judge), or None.
    """
    parts = [f"--per_subtask={run['per_subtask']}"] if run.get("per_subtask") else []
    if sorted(run["subtasks"]) != sorted(spec_bench.SUBTASKS):
        parts.append(f"{len(run['subtasks'])} of the {len(spec_bench.SUBTASKS)} subtasks")
    if run["judge"] != spec_bench.PAPER_JUDGE:
        parts.append(f"judge {run['judge']}")
    return ", ".join(parts) or None


def table3(generation: list[dict]) -> str:
    """House of Cards Table 3: the judge's mean 1-5 score per generation task and their mean, one row per run.

    The method is the run's --label, with its attack in brackets when it has one and a "*" when it is off Table 3's
    protocol (`generation_departure`).

    Args:
      generation: the generation.json records (`load_runs`).

    Returns:
      The table in Markdown.
    """
    rows = [[g["model"], g["label"] + (f" [{g['attack']}]" if g.get("attack") else "")
             + ("*" if generation_departure(g) else "")] + spec_bench.table3_row(g["scores"]) for g in generation]
    return common.markdown_table(["model", "method"] + spec_bench.TABLE3_HEADER, rows)


def table3_notes(generation: list[dict]) -> list[str]:
    """The notes under Table 3: the runs off its protocol, and the judgements that never parsed.

    Args:
      generation: the generation.json records (`load_runs`).

    Returns:
      No note, one or both: the runs marked "*" with their departures; per run, the judgements never parsed (left
      out of the means) of all it judged.
    """
    marked = [f"{g['path']} ({generation_departure(g)})" for g in generation if generation_departure(g)]
    failed = [f"{g['path']}: {n} of {sum(c['judged'] for c in g['counts'].values())}" for g in generation
              if (n := sum(c["failed"] for c in g["counts"].values()))]
    notes = ["* not the paper's protocol, so not comparable with its Table 3: " + "; ".join(marked)] if marked else []
    return notes + (["judgements never parsed (left out of the means): " + "; ".join(failed)] if failed else [])


def longbench_departure(run: dict) -> str | None:
    """How a LongBench run departs from House of Cards Appendix H (16 datasets, every document, 7,500), or None.

    Args:
      run: a longbench.json record (`experiments.longbench`): its "scores" per dataset and "mean", "limit",
        "max_length", "max_gen_toks".

    Returns:
      The departures joined by ", " (--limit, the number of datasets, --max_length, --max_gen_toks), or None.
    """
    parts = [f"--limit={run['limit']}"] if run.get("limit") else []
    datasets = [d for d in run["scores"] if d != "mean"]
    if sorted(datasets) != sorted(longbench.DATASETS):
        parts.append(f"{len(datasets)} of the {len(longbench.DATASETS)} datasets")
    if run["max_length"] != longbench.MAX_LENGTH:
        parts.append(f"--max_length={run['max_length']}")
    if run.get("max_gen_toks"):
        parts.append(f"--max_gen_toks={run['max_gen_toks']}")
    return ", ".join(parts) or None


def table9_row(run: dict) -> list:
    """One row of Table 9: model, method, the score (%) of each of the 16 datasets ("-" where not run), Avg.

    Args:
      run: a longbench.json record (`experiments.longbench`).

    Returns:
      The row's cells; the method and Avg. carry a "*" when the run is off Appendix H's protocol.
    """
    star = "*" if longbench_departure(run) else ""
    scores = run["scores"]
    return ([run["model"], run["label"] + star] + [scores.get(d, "-") for d in longbench.DATASETS]
            + [f"{scores['mean']:.2f}{star}"])


def table9(runs: list[dict]) -> str:
    """House of Cards Table 9: LongBench's 16 English datasets and their mean, one row per long-context run.

    Args:
      runs: longbench.json records (`load_runs`, or `experiments.longbench`'s own run).

    Returns:
      The table in Markdown.
    """
    header = ["model", "method"] + list(longbench.TITLES.values()) + ["Avg."]
    return common.markdown_table(header, [table9_row(run) for run in runs])


def super_weight_table3(run: dict) -> str:
    """The Super Weight's Table 3 from experiments.quantize: perplexity per corpus, the quantized rows with the share
    of SmoothQuant's gain over naive W8A8 in parentheses (as the paper prints it).

    Args:
      run: a quantize.json record with a "table3" part (`load_runs`).

    Returns:
      The table in Markdown.
    """
    t3 = run["table3"]
    corpora = list(t3["rows"]["FP"])
    rows = []
    for name, per_corpus in t3["rows"].items():
        cells = []
        for c in corpora:
            share = None if name == "FP" else t3["share_of_smoothquant_gain"][c].get(name)
            cells.append(f"{per_corpus[c]['perplexity']:.2f}" + ("" if name == "FP" else
                                                                 f" ({share:.0f}%)" if share is not None else " (n/a)"))
        rows.append([name, *cells])
    return common.markdown_table(["PPL", *corpora], rows)


def super_weight_figure7(run: dict) -> list[str]:
    """The Super Weight's Figure 7 from experiments.quantize: one table per metric, block sizes down, curves across.

    Args:
      run: a quantize.json record with a "figure7" part (`load_runs`).

    Returns:
      One Markdown part per metric present (perplexity, zeroshot), headed by the unquantized model's value.
    """
    fig = run["figure7"]
    parts = []
    for metric in ("perplexity", "zeroshot"):
        if metric not in fig:
            continue
        curves = {k: v for k, v in fig[metric].items() if k in defaults.CURVES}  # not its settings' lists
        rows = [[b, *(curve[i] for curve in curves.values())] for i, b in enumerate(fig["blocks"])]
        parts.append(f"{metric} (unquantized {fig[metric]['unquantized']:.2f}):\n\n"
                     + common.markdown_table(["block", *curves], rows))
    return parts


def main(argv):
    """Print and write tables.md (the module doc's tables) from the runs under --runs, into --output_dir.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    root = Path(FLAGS.runs)
    attacks, zeroshot, generation, long_context, quantized = (
        load_runs(root, name) for name in ("attacks", "zeroshot", "generation", "longbench", "quantize"))
    if not (attacks or zeroshot or generation or long_context or quantized):
        raise SystemExit(f"no attacks.json, zeroshot.json, generation.json, longbench.json or quantize.json under "
                         f"{FLAGS.runs}")
    parts = [f"## Table 1 ({run['model']}, seqlen {run['seqlen']})\n\n{table1(run, zeroshot)}" for run in attacks]
    if zeroshot:
        parts.append(bos_note(zeroshot))
        if note := departures_note(zeroshot):
            parts.append(note)
        parts.append(f"## Table 2: zero-shot accuracy\n\n{table2(zeroshot)}")
        parts.append(f"## Table 8: top-3 zeroing\n\n{table8(zeroshot)}")
    if generation:
        parts.append(f"## Table 3: generation tasks, judge's mean score (1-5)\n\n{table3(generation)}")
        parts += table3_notes(generation)
    if long_context:
        marked = [f"{run['path']} ({longbench_departure(run)})" for run in long_context if longbench_departure(run)]
        note = ("\n\n* not the paper's protocol: " + "; ".join(marked)) if marked else ""
        parts.append(f"## Table 9: long context (LongBench)\n\n{table9(long_context)}{note}")
    for run in quantized:
        if "table3" in run:
            t3 = run["table3"]["settings"]
            parts.append(f"## The Super Weight, Table 3 ({run['model']}, W{t3['w_bits']}A{t3['a_bits']}, seqlen "
                         f"{run['seqlen']}; % of SmoothQuant's gain)\n\n{super_weight_table3(run)}")
        if "figure7" in run:
            fig = run["figure7"]
            title = (f"## The Super Weight, Figure 7 ({run['model']}, INT{fig['bits']} by block size; clipping "
                     f"{fig['clip_method']} {fig['clip_threshold']:g})")
            parts.append("\n\n".join([title, *super_weight_figure7(run)]))
    text = "\n\n".join(parts) + "\n"
    print(text)
    out = common.output_dir("outputs/tables")
    (out / "tables.md").write_text(text)
    print(f"wrote {common.publish(out) / 'tables.md'}")


if __name__ == "__main__":
    cli.run(main)
