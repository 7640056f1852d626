"""House of Cards in miniature, end to end on one small model: one Markdown report a reader can check on a laptop.

    python -m experiments.report                          # the embedded SmolLM2-135M: 41 min on a shared 2-core CPU
    python -m experiments.report --quick                  # CI-sized: every step on tiny slices, ~3 minutes
    python -m experiments.report --output_dir=docs/report --seeds=0,1,2

Five sections, each with the paper's claim, the numbers and a verdict computed from them (agrees / does not
agree / inconclusive against the noise the run can measure):
  1. Finding (Table 6, Figure 3): the massive weights' layer (both numberings), the top-5 rows, the bos profile
     figures; the same for --contrast_model (Gemma-3-270M), whose hidden state grows gradually (the paper's
     Gemma-2 contrast, Appendix D).
  2. Attacks (Table 1, Figure 4; thesis Table 4.3; The Super Weight Table 1): perplexity on the local held-out
     text (python_docs, shipped with Python) and accuracy on the templated multiple-choice tasks of
     `mwjax.eval.synthetic_tasks` for the original model, top-5 zeroing / retaining, massive activations set to
     zero / their mean (and the median control), the super weights pruned / pruned with their super activations
     restored; and the k-sweep (perplexity).
  3. Fine-tuning (Tables 2 and 8): LoRA, LoRA + MacDrop, DoRA, DoRA + MacDrop (`mwjax.finetune.job.run`, the
     CPU recipe of configs/smollm2_135m) on the train split of the same tasks, same data and steps for each,
     over --seeds; each adapter's held-out accuracy clean and under top-3 zeroing in both of Table 8's readings
     (`mwjax.research.attacks.after_fine_tuning`: merged, base), mean and spread over seeds.
  4. Pruning (thesis chapter 3): Wanda vs magnitude at 50%, with and without the massive weights (and super
     weights) protected.
  5. Quantization (The Super Weight, Table 3 and Figure 7; `report_quantize`): W8A8 naive / SmoothQuant / the
     super activation held out, and INT4 by block size with and without the super weights handled.

Writes report.md, report.json and the figures into --output_dir (default outputs/report), as one atomic output; the
fine-tuning runs go to --work_dir (default: a temporary directory, removed at the end; adapters are ~10 MB).
The report's header names the command, the mwjax commit and the wall time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

from mwjax import converters
from mwjax.core import atomic, cli, lazy
from mwjax.core.progress import duration
from mwjax.eval import synthetic_tasks
from mwjax.experiments import common, plots, report_quantize
from mwjax.experiments.configs import smollm2_135m
from mwjax.research.defaults import NON_SUPER_WEIGHTS

# what needs jax loads after the flags are parsed: --help answers without it
jnp = lazy.module("jax.numpy")
peft = lazy.module("mwjax.adapters.peft")
compiled = lazy.module("mwjax.core.compiled")
job = lazy.module("mwjax.finetune.job")
likelihood = lazy.module("mwjax.eval.likelihood")
attacks = lazy.module("mwjax.research.attacks")
massive = lazy.module("mwjax.research.massive")
prune = lazy.module("mwjax.research.prune")

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)
flags.DEFINE_bool("quick", False, "CI-sized run: tiny slices of every step, one seed, LoRA and LoRA + MacDrop only")
flags.DEFINE_string("contrast_model", "embedded:gemma3-270m", "model of the finding's contrast (Gemma-2 in the "
                    "paper); empty to skip")
cli.define_numbers("seeds", None, "fine-tuning seeds (default: 0,1 in the full run, 0 with --quick)", lower_bound=0)
flags.DEFINE_string("work_dir", None, "where the fine-tuning runs go (default: a temporary directory)")

CORPUS = "python_docs"  # the held-out local text: Python's own documentation, shipped with Python
NON_SW = "largest other weights pruned (Prune Non-SW)"  # The Super Weight, Table 1's control
TABLE1_K, TABLE8_K = 5, 3  # House of Cards Table 1 attacks the top-5 rows, Table 8 zeroes the top-3
METHODS = {"lora": "LoRA", "lora_macdrop": "LoRA + MacDrop", "dora": "DoRA", "dora_macdrop": "DoRA + MacDrop"}
CHANCE = 1.0 / synthetic_tasks.NUM_CHOICES
RULE = 2.0  # a difference counts when it exceeds this many standard errors


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of each step a run does (FULL: 41 min on a shared 2-core CPU, docs/report; QUICK: a CI test)."""

    seqlen: int  # tokens per perplexity chunk
    max_chunks: int  # perplexity chunks per setting
    sweep: tuple[int, ...]  # Figure 4's k values
    sweep_chunks: int  # perplexity chunks per sweep point
    calibration_sequences: int  # massive-activation means, Wanda (the last chunks of the corpus, after bos)
    calibration_seqlen: int
    per_task: int  # held-out multiple-choice questions per task
    train_per_task: int  # training questions per task (capitals: as many as its train split holds)
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    train_steps: int
    micro_batch: int
    contrast: bool  # run the contrast model
    activations: bool  # the massive-activation and super-weight attacks
    prune_methods: tuple[str, ...]


FULL = Sizes(seqlen=512, max_chunks=4, sweep=(0, 1, 2, 3, 5, 10), sweep_chunks=2, calibration_sequences=16,
             calibration_seqlen=256, per_task=10, train_per_task=150, seeds=(0, 1), methods=tuple(METHODS),
             train_steps=30, micro_batch=4, contrast=True, activations=True, prune_methods=("wanda", "magnitude"))
QUICK = Sizes(seqlen=64, max_chunks=1, sweep=(0, 5), sweep_chunks=1, calibration_sequences=2, calibration_seqlen=32,
              per_task=1, train_per_task=6, seeds=(0,), methods=("lora_macdrop",), train_steps=1, micro_batch=2,
              contrast=False, activations=False, prune_methods=("magnitude",))


def log(message: str) -> None:
    """A progress line with the time, as a SLURM log shows it.

    Args:
      message: the line's text.
    """
    print(f"[report {time.strftime('%H:%M:%S')}] {message}", flush=True)


def verdict(difference: float, standard_error: float) -> str:
    """The verdict on a paper's claim from a measured difference and its standard error.

    Args:
      difference: the measured difference, positive in the direction the paper claims.
      standard_error: the difference's standard error.

    Returns:
      'agrees' when the difference in the claimed direction exceeds RULE standard errors, 'does not agree' when it
      does in the other direction, else 'inconclusive'.
    """
    if difference > RULE * standard_error:
        return "agrees"
    if difference < -RULE * standard_error:
        return "does not agree"
    return "inconclusive"


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n questions.

    Args:
      p: the accuracy, in [0, 1].
      n: the number of questions.

    Returns:
      sqrt(p (1 - p) / n), with p (1 - p) at least 0.25 / n so that it is never 0.
    """
    return math.sqrt(max(p * (1 - p), 0.25 / n) / n)  # never 0: a perfect score on 10 questions is not certain


def pct(x: float) -> str:
    """A fraction as a percentage with one decimal and no "%" sign (0.256 -> "25.6").

    Args:
      x: the fraction (an accuracy).

    Returns:
      The text.
    """
    return f"{100 * x:.1f}"


def git_commit() -> str:
    """The short hash of HEAD of the git checkout this file is in, or "unknown" (no git, not a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------ 1. finding


def growth_share(profile: massive.FirstTokenProfile) -> float:
    """The largest single layer's rise of the hidden state's max |x| as a fraction of its whole rise over the
    embedding.

    Args:
      profile: the first token's per-layer profile (`massive.first_token_profile`).

    Returns:
      The fraction: ~1 for one explosive layer (Llama, Mistral, SmolLM2), small for a gradual growth (Gemma-2).
    """
    top = np.abs(profile.hidden.values[:, 0])
    return float(massive.hidden_jumps(profile).max() / max(top.max() - profile.embed_max, 1e-9))


def finding_of(model, tokenizer, name: str, out: Path) -> dict:
    """Section 1's measurements on one model: its top-TABLE1_K massive weights, its bos profile and two figures.

    Args:
      model: an mwjax causal LM.
      tokenizer: its HF tokenizer; None for the contrast model (loaded without one).
      name: the model's name in the titles and the table; its part after the last ":" ends the figures' names.
      out: the report's (staging) output directory, where the figures go.

    Returns:
      The model's row: its massive weights (`MassiveWeights.to_dict()`, and the object itself under "mw"), layer
      label, number of layers, growth share and largest-rise layer (0-based), the first token's max |hidden| and
      |intermediate| per layer, top-1 / median ratio and the figures' file names.
    """
    mw = massive.find_massive_weights(model, tokenizer, k=TABLE1_K)
    profile = massive.first_token_profile(model, mw.token_id, top_k=3)
    figures = plots.bos_profile(profile, name, lambda fig: common.figure(out, f"{fig}_{name.split(':')[-1]}"))
    log(f"{name}: massive weights at {mw.label}, rows {list(mw.indices)}, values {[round(v, 1) for v in mw.values]}")
    top = np.abs(profile.hidden.values[:, 0])
    return {"model": name, "massive_weights": mw.to_dict(), "label": mw.label, "layers": profile.num_layers,
            "growth_share": growth_share(profile), "largest_rise_layer": int(np.argmax(massive.hidden_jumps(profile))),
            "hidden_max": top.tolist(), "intermediate_max": np.abs(profile.intermediate.values[:, 0]).tolist(),
            "ratio": abs(mw.values[0]) / max(mw.median, 1e-12), "figures": [p.name for p in figures], "mw": mw}


def section_finding(model, tokenizer, sizes: Sizes, out: Path) -> tuple[dict, str]:
    """Section 1, Finding (Table 6, Figure 3): where the massive weights are, on --model and --contrast_model.

    The verdicts: --model agrees when its intermediate state is massive (`meets_criterion`) and its hidden state's
    largest rise is in that same layer; the contrast (the paper's Gemma-2, Appendix D) agrees when under half of its
    hidden rise is in one layer, and less than --model's share. The contrast runs when `sizes.contrast` and
    --contrast_model are set.

    Args:
      model: --model (`common.load_model`).
      tokenizer: its tokenizer.
      sizes: the run's sizes (FULL or QUICK).
      out: the report's (staging) output directory, where the figures go.

    Returns:
      (the section's payload for report.json, its Markdown).
    """
    results = [finding_of(model, tokenizer, common.model_name(), out)]
    if sizes.contrast and FLAGS.contrast_model:
        log(f"loading the contrast model {FLAGS.contrast_model}")
        contrast, _ = converters.load(FLAGS.contrast_model, dtype=jnp.float32, tokenizer=False)
        results.append(finding_of(contrast, None, FLAGS.contrast_model, out))
    rows = [[r["model"], r["massive_weights"]["layer"] + 1, r["massive_weights"]["layer"], list(r["mw"].indices),
             f"{r['mw'].values[0]:.1f}", f"{r['mw'].median:.3g}", f"{r['ratio']:.0f}", r["largest_rise_layer"] + 1,
             f"{r['growth_share']:.2f}"] for r in results]
    table = common.markdown_table(["model", "layer (paper, 1-based)", "HF layer", f"top-{TABLE1_K} rows of W_up / "
                                   "W_gate", "top-1 intermediate value", "median |x|", "top-1 / median",
                                   "largest hidden rise at layer (1-based)", "share of the hidden rise in one layer"],
                                  rows)
    main = results[0]
    one_layer = main["mw"].meets_criterion and main["largest_rise_layer"] == main["mw"].layer
    text = [
        "## 1. Finding: where the massive weights are (Table 6, Figure 3)",
        "",
        "**Claim.** Feeding the bos token alone, the intermediate state act(x W_gate) * (x W_up) of one early "
        "layer's FFN holds a few enormous values (Figure 3(c)); the hidden state's massive activations are born "
        "there and then ride the residual stream (Figure 3(b)). The rows of W_up / W_gate behind the top-k values "
        "are the massive weights (Table 6). Gemma-2 is the exception: its hidden state grows over many layers and "
        "its intermediate explosion is much smaller (Appendix D).",
        "",
        table,
        "",
        f"![bos hidden state]({main['figures'][0]}) ![bos intermediate state]({main['figures'][1]})",
        "",
        f"**{main['model']}.** The intermediate state of {main['label']} reaches {main['mw'].values[0]:.1f}, "
        f"{main['ratio']:.0f}x its median |x|, and the hidden state's largest rise happens at layer "
        f"{main['largest_rise_layer'] + 1} (1-based), carrying {main['growth_share']:.0%} of its whole rise. "
        f"Verdict: **{'agrees' if one_layer else 'does not agree'}** (criterion: the intermediate state is massive "
        "(> 100 and >= 1000x the median) and the hidden state's largest rise is in that same layer).",
    ]
    if len(results) > 1:
        c = results[1]
        gradual = c["growth_share"] < 0.5 and c["growth_share"] < main["growth_share"]
        text += ["", f"![contrast hidden state]({c['figures'][0]}) ![contrast intermediate state]({c['figures'][1]})",
                 "", f"**{c['model']}** (contrast). Its largest single-layer rise carries {c['growth_share']:.0%} of "
                 f"the hidden state's rise (peak {max(c['hidden_max']):.0f} at layer "
                 f"{int(np.argmax(c['hidden_max'])) + 1}, then it falls to {c['hidden_max'][-1]:.0f}); its top "
                 f"intermediate value is {c['mw'].values[0]:.1f} at {c['label']}. Verdict on the Gemma-2 contrast: "
                 f"**{'agrees' if gradual else 'does not agree'}** (criterion: under half of the rise in one layer, "
                 f"and less than {main['model']}'s {main['growth_share']:.0%})."]
    elif sizes.contrast:
        text += ["", "The contrast model was skipped (--contrast_model is empty)."]
    else:
        text += ["", "The contrast model is skipped in a --quick run."]
    return {"models": [{k: v for k, v in r.items() if k != "mw"} for r in results]}, "\n".join(text)


# ------------------------------------------------------------------------------------------------ 2. attacks


def section_attacks(model, tokenizer, mw, corpus, held_out, sizes: Sizes, out: Path) -> tuple[dict, str]:
    """Section 2, Attacks (Table 1, Figure 4; thesis Table 4.3; The Super Weight Table 1), and the k-sweep.

    Perplexity on CORPUS and held-out accuracy of the original model, top-TABLE1_K zeroing / retaining and, when
    `sizes.activations`, the massive activations set to zero / their mean (and the median control) and the super
    weights pruned / pruned with their super activations restored; then the k-sweep's perplexity and its figure.
    Each claim gets a verdict.

    Args:
      model: --model (`common.load_model`).
      tokenizer: its tokenizer.
      mw: its massive weights (`massive.find_massive_weights`, k at least the sweep's largest).
      corpus: CORPUS (`common.load_corpora`): perplexity on its first chunks, the activations' means from its last.
      held_out: the held-out multiple-choice questions (`synthetic_tasks.questions`).
      sizes: the run's sizes (FULL or QUICK).
      out: the report's (staging) output directory, where the k-sweep figure goes.

    Returns:
      (the section's payload for report.json, its Markdown).
    """
    calibration = common.calibration_set([corpus], tokenizer, CORPUS, sizes.calibration_sequences,
                                         sizes.calibration_seqlen, sizes.seqlen) if sizes.activations else None
    settings, ma = attacks.table1_settings(model, mw, TABLE1_K, calibration)
    sws = massive.find_super_weights(model, tokenizer) if sizes.activations else []
    if sws:
        log(f"super weights: {[sw.label for sw in sws]}")
        settings["super weights pruned"] = attacks.scale_super_weight(model, sws, 0.0)
        settings["super weights pruned, super activations restored"] = attacks.restore_super_activation(model, sws)
        settings[NON_SW] = prune.prune_largest_weights(model, NON_SUPER_WEIGHTS, exclude=sws)
    results = {}
    for name, attacked in settings.items():
        ppl = likelihood.perplexity(attacked, corpus.token_ids, sizes.seqlen, max_chunks=sizes.max_chunks,
                                    progress=False).perplexity
        acc = synthetic_tasks.accuracy(attacked, tokenizer, held_out)
        results[name] = {"perplexity": ppl, "accuracy": acc}
        log(f"attack {name}: {CORPUS} PPL {ppl:.2f}, accuracy {pct(acc['mean'])}%")
    tokens = likelihood.chunk_tokens(corpus.token_ids, sizes.seqlen, sizes.sweep_chunks)
    log(f"k-sweep over k={list(sizes.sweep)}")
    series = attacks.k_sweep(model, mw, sizes.sweep,
                             lambda m: likelihood.perplexity(m, tokens, sizes.seqlen, progress=False).perplexity,
                             on_point=lambda name, k, v: log(f"  {name}, k={k}: PPL {v:.2f}"))
    sweep_fig = plots.k_sweep(list(sizes.sweep), series, f"{common.model_name()}: {CORPUS} perplexity, {mw.label} "
                              "attacked", common.figure(out, "k_sweep"))

    n = len(held_out)
    tasks = list(results["original"]["accuracy"])
    rows = [[name, r["perplexity"], *(pct(r["accuracy"][t]) for t in tasks)] for name, r in results.items()]
    table = common.markdown_table(["setting", f"{CORPUS} PPL", *(f"{t} acc (%)" for t in tasks)], rows)
    sweep_table = common.markdown_table(["k", *series], [[k, *(s[i] for s in series.values())]
                                                         for i, k in enumerate(sizes.sweep)])
    orig, zero, keep = (results[s] for s in ("original", f"top-{TABLE1_K} zeroing", f"top-{TABLE1_K} retaining"))
    acc_z, acc_r = zero["accuracy"]["mean"], keep["accuracy"]["mean"]
    acc_verdict = verdict(acc_r - acc_z, math.hypot(binomial_se(acc_z, n), binomial_se(acc_r, n)))
    ppl_verdict = "agrees" if zero["perplexity"] > keep["perplexity"] else "does not agree"
    retained = model.config.intermediate_size - TABLE1_K
    text = [
        "## 2. Attacks on the massive weights (Table 1, Figure 4)",
        "",
        f"**Claim.** Zeroing the top-{TABLE1_K} massive rows of W_up / W_gate (top-{TABLE1_K} zeroing) breaks the "
        f"model, while zeroing every other row of those matrices and keeping only the massive ones (top-"
        f"{TABLE1_K} retaining, here {retained} rows zeroed, ~{retained // TABLE1_K}x more) costs far less "
        "(Table 1: Llama-3-8B's WikiText perplexity 5.75 -> 104.57 zeroed, 10.15 retained). The thesis (Table 4.3) "
        "adds: setting the hidden state's massive activations to zero breaks the model, setting them to their mean "
        "does not; The Super Weight: pruning the super weight(s) breaks it and restoring their super activation "
        "recovers much of the loss.",
        "",
        f"Perplexity: {sizes.max_chunks} x {sizes.seqlen} tokens of {CORPUS} (the first chunks"
        + (f"; the massive-activation means come from its last {len(calibration)} x {sizes.calibration_seqlen} "
           "tokens" if calibration is not None else "; the activation and super-weight attacks are skipped in a "
           "--quick run") + "). Accuracy: "
        f"{n} held-out questions of `mwjax.eval.synthetic_tasks` ({', '.join(tasks[:-1])}; 4 choices, chance 25%), "
        "each choice scored as the answer's log-likelihood (lm-eval's acc)."
        + (f" Massive activations after {mw.label}: dims {list(ma.dims)}." if ma is not None and ma.dims else ""),
        "",
        table,
        "",
        f"**{common.model_name()}.** Top-{TABLE1_K} zeroing: perplexity {orig['perplexity']:.2f} -> "
        f"{zero['perplexity']:.2f}; top-{TABLE1_K} retaining: {keep['perplexity']:.2f}. Verdict (zeroing hurts "
        f"perplexity more than retaining): **{ppl_verdict}**. On the multiple-choice tasks, {pct(acc_z)}% zeroed vs "
        f"{pct(acc_r)}% retained (original {pct(orig['accuracy']['mean'])}%; one question = {100 / n:.1f} points); "
        f"verdict (retaining more accurate than zeroing by over {RULE:g} standard errors): **{acc_verdict}**.",
    ]
    if "massive activations = zero" in results:
        az, am = results["massive activations = zero"], results["massive activations = mean"]
        ok = az["perplexity"] > 2 * orig["perplexity"] and am["perplexity"] < 1.1 * orig["perplexity"]
        text += ["", f"Massive activations set to zero: perplexity {az['perplexity']:.2f}; set to their mean: "
                 f"{am['perplexity']:.2f} (original {orig['perplexity']:.2f}). Verdict (zero more than doubles "
                 f"perplexity, the mean stays within 10%): **{'agrees' if ok else 'does not agree'}**."]
    if sws:
        sp, sr = results["super weights pruned"], results["super weights pruned, super activations restored"]
        ok = sp["perplexity"] > 2 * orig["perplexity"] and sr["perplexity"] < sp["perplexity"]
        other = results[NON_SW]
        text += ["", f"Super weights ({', '.join(sw.label for sw in sws)}) pruned: perplexity {sp['perplexity']:.2f}; "
                 f"with the super activations restored: {sr['perplexity']:.2f}. Verdict (pruning more than doubles "
                 f"perplexity, restoring lowers it): **{'agrees' if ok else 'does not agree'}**. The Super Weight's "
                 f"control (Table 1, Prune Non-SW): the {NON_SUPER_WEIGHTS} largest other decoder weights pruned "
                 f"instead, perplexity {other['perplexity']:.2f}. Verdict (the super weights matter more than the "
                 f"{NON_SUPER_WEIGHTS} largest others together: pruning them costs more perplexity): "
                 f"**{'agrees' if sp['perplexity'] > other['perplexity'] else 'does not agree'}**."]
    zs, rs = series["top-k zeroing"], series["top-k retaining"]
    text += ["", f"**k-sweep (Figure 4, perplexity on {len(tokens)} x {sizes.seqlen} tokens).** Figure 4 plots "
             "zero-shot accuracy; perplexity is the cheaper signal here. Zeroing should worsen as k grows, "
             "retaining improve.", "", sweep_table, "", f"![k-sweep]({sweep_fig.name})", "",
             f"Zeroing from k={sizes.sweep[0]} to k={sizes.sweep[-1]}: {zs[0]:.2f} -> {zs[-1]:.2f}; retaining: "
             f"{rs[0]:.2f} -> {rs[-1]:.2f}. Verdict (zeroing worse at the largest k than at the smallest, "
             f"retaining better): **{'agrees' if zs[-1] > zs[0] and rs[-1] < rs[0] else 'does not agree'}**."]
    payload = {"corpus": CORPUS, "seqlen": sizes.seqlen, "chunks": sizes.max_chunks, "questions": n,
               "massive_activations": None if ma is None else ma.to_dict(),
               "super_weights": [sw.to_dict() for sw in sws], "settings": results,
               "k_sweep": {"k": list(sizes.sweep), "chunks": len(tokens), **series},
               "verdicts": {"perplexity": ppl_verdict, "accuracy": acc_verdict}}
    return payload, "\n".join(text)


# ------------------------------------------------------------------------------------------------ 3. fine-tuning


def run_config(variant: str, seed: int, records: Path, cutoff: int, sizes: Sizes, work: Path):
    """One of Table 2's runs in the CPU recipe of configs/smollm2_135m (LoRA/DoRA rank 8, lr 1e-3, MacDrop's
    Step curriculum from p0 = 0.8 on the top-5 rows), on the report's data, steps and seed.

    Args:
      variant: one of METHODS' keys ("lora", "lora_macdrop", "dora", "dora_macdrop").
      seed: the training seed (the adapter's initialisation, the batch order, MacDrop's masks).
      records: the training data, a JSON-lines file of Alpaca records.
      cutoff: cutoff_len in tokens (the longest encoded record, so nothing is cut).
      sizes: the run's sizes (steps, micro-batch).
      work: the directory the run writes into (its output_dir is work/report_<variant>_seed<seed>).

    Returns:
      The run's ConfigDict, for `mwjax.finetune.job.run`.
    """
    c = smollm2_135m.get_config(variant)
    c.name = f"report_{variant}_seed{seed}"
    c.model, c.output_dir, c.overwrite_output_dir, c.eval_before = FLAGS.model, str(work / c.name), True, False
    c.data.update({"source": str(records), "template": "plain", "cutoff_len": cutoff, "val_size": 0})
    c.train.update({"max_steps": sizes.train_steps, "micro_batch_size": sizes.micro_batch, "grad_accum": 1,
                    "seed": seed, "save_every": 0, "eval_every": 0, "log_every": max(1, sizes.train_steps // 4)})
    return c


def summarize(values: list[float], n: int) -> dict:
    """Mean, spread (sample std over seeds) and standard error of an accuracy measured over seeds on n questions.

    Args:
      values: the accuracy of each seed.
      n: the number of questions each was measured on.

    Returns:
      {"values", "mean", "sd", "se"}; se combines the seeds' variance (sd^2 / seeds) and the questions' binomial
      variance (`binomial_se` of the mean).
    """
    mean = float(np.mean(values))
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"values": values, "mean": mean, "sd": sd,
            "se": math.sqrt(sd ** 2 / len(values) + binomial_se(mean, n) ** 2)}


def fmt(s: dict) -> str:
    """A `summarize` result as a table cell in percent: "mean ± sd" over several seeds, the mean alone for one.

    Args:
      s: a `summarize` result.

    Returns:
      The cell's text.
    """
    return f"{pct(s['mean'])} ± {pct(s['sd'])}" if len(s["values"]) > 1 else pct(s["mean"])


def section_fine_tuning(model, tokenizer, mw, held_out, sizes: Sizes, out: Path, work: Path) -> tuple[dict, str]:
    """Section 3, Fine-tuning (Tables 2 and 8 in miniature): each method over the seeds, clean and attacked.

    Every method of `sizes.methods` is trained for every seed (--seeds, else `sizes.seeds`) on the train split of the
    synthetic tasks (`run_config`), then scored on the held-out questions clean and under top-TABLE8_K zeroing in
    both of Table 8's readings (`attacks.after_fine_tuning`: merged, base). Each method is compared with its MacDrop
    twin per reading (`verdict`).

    Args:
      model: --model (`common.load_model`), the base of every adapter.
      tokenizer: its tokenizer.
      mw: its massive weights, zeroed for the pretrained model's attacked accuracy.
      held_out: the held-out multiple-choice questions (`synthetic_tasks.questions`).
      sizes: the run's sizes (FULL or QUICK).
      out: the report's (staging) output directory, where the figure goes.
      work: where the training data and the fine-tuning runs go.

    Returns:
      (the section's payload for report.json, its Markdown).
    """
    from mwjax.finetune import data

    seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else list(sizes.seeds)
    train_qs = synthetic_tasks.questions("train", sizes.train_per_task, seed=0)
    records = synthetic_tasks.instruction_records(train_qs)
    path = work / "train.jsonl"
    atomic.write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
    cfg = data.DataConfig(template="plain")
    cutoff = max(len(data.encode(r, tokenizer, cfg).input_ids) for r in records)
    n = len(held_out)
    readings = ("clean", "merged", "base")
    original = {"clean": synthetic_tasks.accuracy(model, tokenizer, held_out)["mean"],
                "attacked": synthetic_tasks.accuracy(attacks.zero_top_k(model, mw, TABLE8_K), tokenizer,
                                                     held_out)["mean"]}
    log(f"original model: {pct(original['clean'])}% clean, {pct(original['attacked'])}% under top-{TABLE8_K} "
        "zeroing")
    runs: dict[str, list[dict]] = {}
    for variant in sizes.methods:
        for seed in seeds:
            log(f"fine-tuning {METHODS[variant]}, seed {seed}: {sizes.train_steps} steps x {sizes.micro_batch} "
                f"examples of {len(records)}")
            t0 = time.time()
            summary = job.run(run_config(variant, seed, path, cutoff, sizes, work), loaded=(model, tokenizer))
            adapter = summary["adapter"]
            scores = {"clean": synthetic_tasks.accuracy(peft.merge(peft.load_adapters(model, adapter)), tokenizer,
                                                        held_out)["mean"]}
            for on in ("merged", "base"):
                attacked = attacks.after_fine_tuning(model, tokenizer, f"zero_top_k:{TABLE8_K}", adapter, on)
                scores[on] = synthetic_tasks.accuracy(attacked, tokenizer, held_out)["mean"]
            runs.setdefault(variant, []).append({"seed": seed, "final_train_loss": summary["final_train_loss"],
                                                 "eval_losses": summary["eval_losses"], **scores,
                                                 "seconds": time.time() - t0})
            log(f"  {METHODS[variant]} seed {seed}: loss {summary['final_train_loss']:.3f}; accuracy "
                + ", ".join(f"{r} {pct(scores[r])}%" for r in readings))
    stats = {v: {r: summarize([x[r] for x in rs], n) for r in readings} for v, rs in runs.items()}

    header = ["method", "clean acc (%)", f"top-{TABLE8_K} zeroing, merged (%)", f"top-{TABLE8_K} zeroing, base (%)",
              "final train loss"]
    rows = [["pretrained (no fine-tuning)", pct(original["clean"]), pct(original["attacked"]), "-", "-"]]
    rows += [[METHODS[v], *(fmt(stats[v][r]) for r in readings),
              f"{np.mean([x['final_train_loss'] for x in runs[v]]):.3f}"] for v in runs]
    table = common.markdown_table(header, rows)
    comparisons, verdicts = [], {}
    for plain_v in ("lora", "dora"):
        drop_v = f"{plain_v}_macdrop"
        if plain_v not in stats or drop_v not in stats:
            continue
        for r in readings:
            a, b = stats[plain_v][r], stats[drop_v][r]
            diff, se = b["mean"] - a["mean"], math.hypot(a["se"], b["se"])
            verdicts[f"{drop_v} vs {plain_v}, {r}"] = v = verdict(diff, se)
            comparisons.append([f"{METHODS[drop_v]} vs {METHODS[plain_v]}", r, f"{100 * diff:+.1f}",
                                f"{100 * se:.1f}", v])
    compare = common.markdown_table(["comparison", "reading", "difference (points)", "standard error (points)",
                                     "verdict"], comparisons)
    fig = plots.grouped_bars_with_errors(
        [METHODS[v] for v in runs],
        {"clean": ([100 * stats[v]["clean"]["mean"] for v in runs], [100 * stats[v]["clean"]["sd"] for v in runs]),
         **{f"top-{TABLE8_K} zeroing, {r}": ([100 * stats[v][r]["mean"] for v in runs],
                                             [100 * stats[v][r]["sd"] for v in runs]) for r in ("merged", "base")}},
        f"{common.model_name()}: held-out accuracy after fine-tuning ({len(seeds)} seed(s), spread = std)",
        common.figure(out, "fine_tuning"), reference=100 * CHANCE)
    text = [
        "## 3. Fine-tuning with MacDrop (Tables 2 and 8 in miniature)",
        "",
        "**Claim.** Dropping the pretrained massive weights during LoRA / DoRA fine-tuning on a curriculum "
        "(MacDrop: p0 = 0.8, decreasing to 0) improves zero-shot accuracy a little (Table 2: e.g. Llama-3-8B "
        "DoRA 75.3 -> 76.1 mean) and makes the fine-tuned model far more robust to top-3 zeroing (Table 8: "
        "Llama-3-8B DoRA 40.3 -> 72.7 under the attack).",
        "",
        f"Data: {len(records)} training questions of the same four tasks (train split; "
        f"`synthetic_tasks.instruction_records`, the 'plain' template, cutoff {cutoff} tokens), {n} held-out "
        f"questions whose facts never appear in training. Each run: {sizes.train_steps} steps of "
        f"{sizes.micro_batch} examples, seeds {seeds} (the seed sets the adapter's initialisation, the batch order "
        "and MacDrop's masks; data and steps are the same for every method). Table 8's two readings: *merged* "
        f"(the adapter merged, the massive weights found again on the merged model and its top-{TABLE8_K} rows "
        f"zeroed) and *base* (the rows found before fine-tuning zeroed in the pretrained weights under the live "
        "adapter, as MacDrop drops them). Accuracies are mean ± standard deviation over seeds.",
        "",
        table,
        "",
        f"![fine-tuning]({fig.name})",
        "",
    ]
    if verdicts:
        agree = sum(v == "agrees" for v in verdicts.values())
        disagree = sum(v == "does not agree" for v in verdicts.values())
        text += [f"MacDrop's effect, with the standard error of the difference (seeds' spread and the {n} questions' "
                 f"binomial error); a verdict needs the difference beyond {RULE:g} standard errors:", "", compare, "",
                 f"**{common.model_name()}.** Of {len(verdicts)} comparisons, {agree} agree with the paper, "
                 f"{disagree} go against it and {len(verdicts) - agree - disagree} are inconclusive at this size. "
                 f"A {sizes.train_steps}-step fine-tuning of a 135M model on templated questions is a miniature: a "
                 "null result here says the effect, if any, is smaller than this run can resolve, not that it is "
                 "absent."]
    else:
        text.append("MacDrop's effect needs a method and its MacDrop twin; this run has "
                    f"{', '.join(METHODS[v] for v in runs)} only (a --quick run), so no comparison is made.")
    payload = {"seeds": seeds, "train_questions": len(records), "held_out_questions": n, "cutoff_len": cutoff,
               "steps": sizes.train_steps, "micro_batch": sizes.micro_batch, "original": original, "runs": runs,
               "stats": stats, "verdicts": verdicts}
    return payload, "\n".join(text)


# ------------------------------------------------------------------------------------------------ 4. pruning


def section_pruning(model, tokenizer, mw, corpus, sizes: Sizes, out: Path) -> tuple[dict, str]:
    """Section 4, Pruning (thesis chapter 3): each of `sizes.prune_methods` at 50%, with and without protection.

    'massive' protects the top-TABLE1_K rows of W_gate / W_up and the super weights; Wanda calibrates on the end of
    `corpus` without bos. The verdict (Wanda's perplexity below magnitude's) needs both methods.

    Args:
      model: --model (`common.load_model`).
      tokenizer: its tokenizer.
      mw: its massive weights: the rows protected and counted.
      corpus: CORPUS (`common.load_corpora`): perplexity on its first chunks, Wanda's calibration from its last.
      sizes: the run's sizes (FULL or QUICK).
      out: the report's (staging) output directory (unused: this section draws no figure).

    Returns:
      (the section's payload for report.json, its Markdown).
    """
    sws = massive.find_super_weights(model, tokenizer)
    calibration = common.calibration_set([corpus], tokenizer, CORPUS, sizes.calibration_sequences,
                                         sizes.calibration_seqlen, sizes.seqlen, bos=False)  # Wanda's: no bos
    evaluate = lambda m: likelihood.perplexity(m, corpus.token_ids, sizes.seqlen, max_chunks=sizes.max_chunks,
                                               progress=False).perplexity
    dense = evaluate(model)
    protections = {"none": None, "massive": prune.protected(model, mw, TABLE1_K, sws)}
    results = []
    for method in sizes.prune_methods:
        for name, protect in protections.items():
            masks = prune.masks_for(model, method, "0.5", calibration=calibration, protect=protect, progress=False)
            ppl = evaluate(prune.apply(model, masks))
            hit = prune.removed(masks, mw, TABLE1_K, sws)
            results.append({"method": method, "protect": name, "perplexity": ppl, "removed": hit,
                            "sparsity": prune.sparsity_of(masks)["overall"]})
            log(f"prune {method} 50%, protect {name}: PPL {ppl:.2f}, massive-row entries pruned "
                f"{hit['massive_rows']['entries_pruned']} / {hit['massive_rows']['entries']}")
    get = {(r["method"], r["protect"]): r for r in results}
    rows = [["dense", "-", "0%", dense, "-", "-"]] + [
        [r["method"], r["protect"], f"{r['sparsity']:.1%}", r["perplexity"],
         f"{r['removed']['massive_rows']['entries_pruned']} / {r['removed']['massive_rows']['entries']}",
         f"{r['removed']['super_weights']['pruned']} / {r['removed']['super_weights']['count']}"
         if "super_weights" in r["removed"] else "-"] for r in results]
    table = common.markdown_table(["method", "protected", "sparsity", f"{CORPUS} PPL",
                                   f"top-{TABLE1_K} massive-row entries pruned", "super weights pruned"], rows)
    lines = []
    for method in sizes.prune_methods:
        a, b = get[(method, "none")], get[(method, "massive")]
        lines.append(f"{method}: {a['removed']['massive_rows']['entries_pruned']} of the "
                     f"{a['removed']['massive_rows']['entries']} massive-row entries pruned unprotected; "
                     f"protecting them changes perplexity {a['perplexity']:.2f} -> {b['perplexity']:.2f} "
                     f"({'better' if b['perplexity'] < a['perplexity'] else 'not better'})")
    text = [
        "## 4. Pruning against the massive weights (thesis chapter 3)",
        "",
        "**Claim.** Wanda (|W| x the input's norm per output row, from calibration text) prunes an LLM to 50% with "
        "far less damage than magnitude pruning (thesis Table 3.3). If the massive weights carry the model, a "
        "pruning that removes them should hurt and protecting them should help; Wanda's score already keeps "
        "large-input weights.",
        "",
        f"Wanda calibrated on {len(calibration)} x {sizes.calibration_seqlen} tokens of the end of {CORPUS} "
        f"(apart from the evaluated text); 'massive' protects the top-{TABLE1_K} rows of W_gate / W_up and the "
        f"super weights ({len(sws)}).",
        "",
        table,
        "",
    ]
    verdicts = {}
    if ("wanda", "none") in get and ("magnitude", "none") in get:
        wanda, magnitude = get[("wanda", "none")]["perplexity"], get[("magnitude", "none")]["perplexity"]
        verdicts["wanda_better"] = "agrees" if wanda < magnitude else "does not agree"
        text.append(f"**{common.model_name()}.** Wanda {wanda:.2f} vs magnitude {magnitude:.2f} at 50% (dense "
                    f"{dense:.2f}). Verdict (Wanda better): **{verdicts['wanda_better']}**. " + "; ".join(lines) + ".")
    else:
        text.append(f"**{common.model_name()}.** Only {', '.join(sizes.prune_methods)} in a --quick run (dense "
                    f"{dense:.2f}): " + "; ".join(lines) + ".")
    return {"dense": dense, "calibration": [len(calibration), sizes.calibration_seqlen], "settings": results,
            "verdicts": verdicts}, "\n".join(text)


# ------------------------------------------------------------------------------------------------ the report


def command_line() -> str:
    """The command that made the report, for its header: `python -m experiments.report` and the arguments given."""
    args = " ".join(a for a in sys.argv[1:])
    return f"python -m experiments.report {args}".strip()


def main(argv):
    """Run the report (QUICK with --quick, else FULL); the fine-tuning runs go to --work_dir or a temporary directory.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    start = time.time()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("jax", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sizes = QUICK if FLAGS.quick else FULL
    out = common.output_dir("outputs/report")
    commit = git_commit()
    log(f"{'quick' if FLAGS.quick else 'full'} report of {FLAGS.model} at mwjax {commit} into "
        f"{common.final_path(out)}")
    with tempfile.TemporaryDirectory(prefix="mwjax_report_") as tmp:
        work = Path(FLAGS.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # the fine-tunings of one method differ only in their seed: their training steps compile to the same
        # program, which this cache keeps (a minute per run on a CPU), unless a cache directory is set already
        compiled.keep_compiled_programs(work / "jax_cache")
        report(sizes, out, work, start, commit)


def report(sizes: Sizes, out: Path, work: Path, start: float, commit: str) -> None:
    """Runs the five sections on --model and writes report.md, report.json and the figures into `out`.

    Args:
      sizes: the run's sizes (FULL or QUICK).
      out: the staging output directory (`common.output_dir`), published at the end.
      work: where the fine-tuning runs go.
      start: when the run began (`time.time()`), for the wall time.
      commit: the mwjax commit the header and report.json name.
    """
    model, tokenizer = common.load_model()
    mw = massive.find_massive_weights(model, tokenizer, k=max(TABLE1_K, max(sizes.sweep)))
    corpus = common.load_corpora([CORPUS], tokenizer, sizes.max_chunks)[0]
    held_out = synthetic_tasks.questions("held_out", sizes.per_task, seed=0)
    payload = {"model": FLAGS.model, "commit": commit, "quick": FLAGS.quick, "sizes": dataclasses.asdict(sizes)}
    sections = []
    log("1/5 finding")
    payload["finding"], text = section_finding(model, tokenizer, sizes, out)
    sections.append(text)
    log("2/5 attacks")
    payload["attacks"], text = section_attacks(model, tokenizer, mw, corpus, held_out, sizes, out)
    sections.append(text)
    log("3/5 fine-tuning")
    payload["fine_tuning"], text = section_fine_tuning(model, tokenizer, mw, held_out, sizes, out, work)
    sections.append(text)
    log("4/5 pruning")
    payload["pruning"], text = section_pruning(model, tokenizer, mw, corpus, sizes, out)
    sections.append(text)
    log("5/5 quantization")
    payload["quantization"], text = report_quantize.section(model, tokenizer, corpus, sizes, out, log, verdict,
                                                            FLAGS.quick)
    sections.append(text)

    wall = time.time() - start
    payload["wall_seconds"] = wall
    header = [
        f"# House of Cards in miniature: {common.model_name()}",
        "",
        f"Generated by `{command_line()}` at mwjax commit `{commit}` in {duration(wall)} of wall time "
        f"({'a --quick run: tiny slices, not evidence' if FLAGS.quick else 'the default full run'}; one CPU "
        "machine). Every number below comes from this run (report.json); every verdict is computed from the "
        "numbers by the rule stated beside it. Figures and numbers are small-model analogues of House of Cards' "
        "Tables 1, 2, 6, 8 and Figures 3, 4 and The Super Weight's Tables 1, 3 and Figure 7, run without any "
        "download.",
    ]
    atomic.write_text_atomically(out / "report.md", "\n\n".join(["\n".join(header), *sections]) + "\n")
    common.write_json(out / "report.json", payload)
    final = common.publish(out)  # report.md, report.json and the figures appear together
    log(f"wrote {final / 'report.md'}, report.json and figures; wall time {duration(wall)} ({wall:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
