"""The Super Weight, Table 3 and Figure 7 for any model: round-to-nearest quantization that handles the super
outliers, against naive round-to-nearest and SmoothQuant.

    python -m experiments.quantize --seqlen=512 --max_chunks=8          # the embedded SmolLM2, CPU-sized
    python -m experiments.quantize --model=PATH --datasets=wikitext2,c4  # the paper's corpora (hub)
    python -m experiments.quantize --parts=figure7 --metrics=perplexity,zeroshot --data_dir=tasks/

Table 3 (--parts=table3): W8A8 round-to-nearest (`mwjax.quantize`): the weights symmetric per tensor
(--weight_block), every decoder Linear's input symmetric per tensor (--act_granularity; one scale per sequence),
dynamic. Rows: the unquantized model; naive W8A8; SmoothQuant (--alpha, factors from the max |x| per channel over
--calibration_sequences x --calibration_seqlen tokens at the END of --calibration, kept apart from the evaluated
text); W8A8 with the super activation held out of each tensor's scale and restored (no calibration data).
Perplexity on every corpus, with the share of SmoothQuant's gain each row keeps, as the paper prints it. All three
quantized rows run one compiled program.

Figure 7 (--parts=figure7): weight-only round-to-nearest, asymmetric min/max per block of --blocks consecutive
weights of the flattened PyTorch weight (the reference's `quantize_blockwise`, --bits=4), --curves: plain
round-to-nearest (rtn); only the super weights handled, kept out of their blocks' range and restored in full
precision (held_out: the caption's "just handling the single scalar-valued super weight"); every weight clipped
(--clip_method at --clip_threshold, the reference's z-score 9) and the super weights restored (clip_restore: the
reference code's method); and clipped alone (clip: what the restore adds). Super weights:
`mwjax.massive.find_super_weights` on the reference prompt (the JSON says how each compares with the largest other
weight of its tensor: a super weight that is not its tensor's largest sets no range). Measured as perplexity on the
first corpus and, with --metrics=zeroshot, as mean zero-shot accuracy over --tasks (lm-eval; --data_dir for local
task files, as experiments.zeroshot). Every point of every curve runs one compiled program.

Writes quantize.json, table3.md, figure7.md and block_sweep.png (block_sweep_zeroshot.png; --format=pdf|svg)
under --output_dir; progress lines as it goes.
"""

from __future__ import annotations

import time

from absl import flags

from mwjax.core import cli, lazy
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots, zeroshot_flags
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
massive = lazy.module("mwjax.research.massive")
quantize = lazy.module("mwjax.research.quantize")
smoothquant = lazy.module("mwjax.research.quantize.smoothquant")
sweep = lazy.module("mwjax.research.quantize.sweep")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(zeroshot_flags)
PARTS = ("table3", "figure7")
flags.DEFINE_list("parts", list(PARTS), "what to run: table3 (W8A8 vs SmoothQuant) and / or figure7 (block sizes)")
flags.DEFINE_list("datasets", ["python_docs"], "corpora: wikitext2, c4, pg19 (hub), python_docs (embedded) or paths")
common.check_flag("datasets", check_corpus)
flags.DEFINE_integer("seqlen", 2048, "tokens per perplexity chunk (SmoothQuant's evaluation: 2048)", lower_bound=2)
flags.DEFINE_integer("max_chunks", None, "cap on chunks per corpus", lower_bound=1)
flags.DEFINE_integer("batch_size", 1, "chunks per forward pass", lower_bound=1)
# Table 3
flags.DEFINE_integer("w_bits", 8, "Table 3's weight bits (W8A8)", lower_bound=2, upper_bound=16)
flags.DEFINE_integer("a_bits", 8, "Table 3's activation bits (W8A8)", lower_bound=2, upper_bound=16)
flags.DEFINE_enum("weight_block", "tensor", ["tensor", "channel"], "Table 3's weight scale: one per tensor (the "
                  "paper's per-tensor W8A8) or per output channel")
flags.DEFINE_enum("act_granularity", "tensor", list(defaults.GRANULARITIES), "Table 3's activation scale: per tensor "
                  "(one per sequence; the super activation is held out of it) or per token")
cli.define_float("alpha", defaults.SMOOTHQUANT_ALPHA, "SmoothQuant's migration strength", lower_bound=0.0,
                 upper_bound=1.0)
flags.DEFINE_string("calibration", "python_docs", "corpus whose LAST chunks calibrate SmoothQuant (kept apart from "
                    "the evaluated text; SmoothQuant: 512 sequences of the Pile's validation set)")
common.check_flag("calibration", check_corpus)
flags.DEFINE_integer("calibration_sequences", 64, "SmoothQuant calibration sequences (SmoothQuant: 512)", lower_bound=1)
flags.DEFINE_integer("calibration_seqlen", 512, "tokens per calibration sequence (SmoothQuant: 512)", lower_bound=2)
# Figure 7
flags.DEFINE_list("blocks", ["64", "256", "1024", "4096"], "Figure 7's block sizes, smallest first: "
                  "integers (consecutive weights of the flattened PyTorch weight; one that does not divide a tensor's "
                  "size quantizes that tensor whole, as the reference does), channel or tensor")
flags.DEFINE_integer("bits", 4, "Figure 7's weight bits (the reference: INT4)", lower_bound=2, upper_bound=16)
flags.DEFINE_enum("clip_method", "zscore", [m for m in defaults.CLIP_METHODS if m != "none"],
                  "how Figure 7's handled curve clips the weights before the super weights are restored")
cli.define_float("clip_threshold", 9.0, "the clipping threshold: z for zscore (the reference's 9), the multiplier "
                 "of the IQR, or the fraction clipped for the percentage methods (< 1)", above=0)
flags.DEFINE_list("metrics", ["perplexity"], "Figure 7's metric: perplexity (the first corpus) and/or zeroshot (mean "
                  "zero-shot accuracy over --tasks)")
common.check_flag("metrics", zeroshot_flags.check_metric)
flags.DEFINE_integer("sweep_chunks", None, "a further cap on the first corpus's chunks per Figure 7 point",
                     lower_bound=1)
CURVE_NAMES = {"rtn": defaults.ROUND_TO_NEAREST, "held_out": defaults.HELD_OUT, "clip_restore": defaults.HANDLED,
               "clip": defaults.CLIPPED}
flags.DEFINE_list("curves", ["rtn", "held_out", "clip_restore"], "Figure 7's curves: rtn (round-to-nearest), held_out "
                  "(only the super weights kept out of the range and restored), clip_restore (every weight clipped, "
                  "the super weights restored: the reference's method) and clip (clipped alone: the restore's share)")


def _check_part(name: str) -> None:
    if name not in PARTS:
        raise ValueError(f"unknown part {name!r}; write table3, figure7 or both (comma-separated)")


def parse_block(value: str) -> int | str:
    """A --blocks item: a positive integer, channel or tensor.

    Args:
      value: the item as written (ValueError for anything else).

    Returns:
      The int block size, or "channel" / "tensor".
    """
    if value in ("channel", "tensor"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"block size {value!r}: write a positive integer, channel or tensor")
    return int(value)


def _check_curve(name: str) -> None:
    if name not in CURVE_NAMES:
        raise ValueError(f"unknown curve {name!r}; choose from {', '.join(CURVE_NAMES)}")


common.check_flag("parts", _check_part)
common.check_flag("curves", _check_curve)
common.check_flag("blocks", parse_block)


def _check_clipping(values: dict) -> bool:
    try:
        defaults.check_clip(values["clip_method"], values["clip_threshold"])
    except ValueError as e:
        raise flags.ValidationError(f"--clip_threshold={values['clip_threshold']}: {e}") from None
    return True


flags.register_multi_flags_validator(["clip_method", "clip_threshold"], _check_clipping)


def log(message: str) -> None:
    """A progress line with the time.

    Args:
      message: the line's text.
    """
    print(f"[quantize {time.strftime('%H:%M:%S')}] {message}", flush=True)


def table3(model, tokenizer, corpora) -> dict:
    """Table 3: perplexity per corpus of the float model and the three W8A8 rows (`sweep.table3_points`).

    SmoothQuant is calibrated on --calibration first (`common.calibration_set`, `smoothquant.input_max`).

    Args:
      model: the float model.
      tokenizer: its tokenizer (for the calibration corpus).
      corpora: the evaluated corpora (`common.load_corpora`).

    Returns:
      {"rows": {row: {corpus: `PerplexityResult.to_dict()`}}, "share_of_smoothquant_gain": {corpus: {row: % or
      None}}, "calibration": [sequences, seqlen], "settings": the flags used}.
    """
    calibration = common.calibration_set(corpora, tokenizer, FLAGS.calibration, FLAGS.calibration_sequences,
                                         FLAGS.calibration_seqlen, FLAGS.seqlen)
    act_max = smoothquant.input_max(model, calibration)
    factors = smoothquant.factors(model, act_max, FLAGS.alpha)
    points = sweep.table3_points(FLAGS.w_bits, FLAGS.a_bits, FLAGS.weight_block, FLAGS.act_granularity)

    def evaluate(name, m):
        log(f"Table 3: {name}")
        result = {c.name: likelihood.perplexity(m, c.token_ids, FLAGS.seqlen, max_chunks=c.max_chunks,
                                                batch_size=FLAGS.batch_size).to_dict() for c in corpora}
        log(f"  {name}: " + ", ".join(f"{c} PPL {r['perplexity']:.3f}" for c, r in result.items()))
        return result

    rows = {"FP": evaluate("unquantized", model)}
    for name, point in zip(points, sweep.models(model, list(points.values()), smoothing=factors), strict=True):
        rows[name] = evaluate(name, quantize.materialize(point))
    share = {c.name: {name: sweep.share_of_gain(*(rows[r][c.name]["perplexity"] for r in
                                                  (sweep.NAIVE, sweep.SMOOTHQUANT)), rows[name][c.name]["perplexity"])
                      for name in points} for c in corpora}
    return {"rows": rows, "share_of_smoothquant_gain": share, "calibration": [len(calibration),
                                                                              FLAGS.calibration_seqlen],
            "settings": {"w_bits": FLAGS.w_bits, "a_bits": FLAGS.a_bits, "weight_block": FLAGS.weight_block,
                         "act_granularity": FLAGS.act_granularity, "alpha": FLAGS.alpha,
                         "calibration_corpus": FLAGS.calibration}}


def table3_markdown(result: dict, corpora) -> str:
    """Table 3 as the paper prints it: perplexity per corpus, the share of SmoothQuant's gain in parentheses.

    Args:
      result: `table3`'s result.
      corpora: the evaluated corpora, one column each.

    Returns:
      The table in Markdown.
    """
    rows = []
    for name, per_corpus in result["rows"].items():
        cells = []
        for c in corpora:
            share = result["share_of_smoothquant_gain"][c.name].get(name)
            cells.append(f"{per_corpus[c.name]['perplexity']:.3f}" + ("" if name == "FP" else
                                                                      f" ({share:.0f}%)" if share is not None
                                                                      else " (n/a)"))
        rows.append([name, *cells])
    return common.markdown_table(["PPL", *(c.name for c in corpora)], rows)


def figure7(model, tokenizer, corpora, zeroshot, out) -> dict:
    """Figure 7: each metric at each block size per curve (`sweep.block_sweep`), one compiled program for all points.

    Finds the super weights (`massive.find_super_weights`), and draws block_sweep[_zeroshot] into `out`.

    Args:
      model: the float model.
      tokenizer: its tokenizer.
      corpora: the evaluated corpora; perplexity is measured on the first.
      zeroshot: the zero-shot evaluator (`zeroshot_flags.evaluator`) when --metrics has zeroshot, else None.
      out: the output directory the figures go to.

    Returns:
      {"blocks", "bits", "clip_method", "clip_threshold", "super_weights", "whole_tensor_fallback",
      "super_weight_vs_tensor_max", and per metric {"unquantized": value, curve: [value per block], settings}}.
    """
    sws = massive.find_super_weights(model, tokenizer)
    log("super weights restored: " + (", ".join(f"{sw.label} = {sw.weight:.4g}" for sw in sws)
                                      or "none found (the handled curve only clips)"))
    blocks = [parse_block(b) for b in FLAGS.blocks]
    labels = [str(b) for b in blocks]  # as `sweep.whole_tensor_fallbacks` keys them ("064" is 64)
    curves = [CURVE_NAMES[c] for c in FLAGS.curves]
    first = corpora[0]
    caps = [c for c in (first.max_chunks, FLAGS.sweep_chunks) if c is not None]
    tokens = likelihood.chunk_tokens(first.token_ids, FLAGS.seqlen, min(caps) if caps else None)
    metrics = zeroshot_flags.sweep_metrics(
        FLAGS.metrics, tokenizer, zeroshot, f"{first.name} perplexity",
        lambda m: likelihood.perplexity(m, tokens, FLAGS.seqlen, batch_size=FLAGS.batch_size).perplexity,
        {"corpus": first.name, "chunks": len(tokens)})
    result = {"blocks": labels, "bits": FLAGS.bits, "clip_method": FLAGS.clip_method,
              "clip_threshold": FLAGS.clip_threshold, "super_weights": [sw.to_dict() for sw in sws],
              "whole_tensor_fallback": sweep.whole_tensor_fallbacks(model, blocks),
              "super_weight_vs_tensor_max": sweep.super_weight_ratios(model, sws)}
    if not sws:  # nothing to restore: the handled curves would repeat the others
        curves = [c for c in curves if c not in (sweep.HANDLED, sweep.HELD_OUT)] or [sweep.ROUND_TO_NEAREST]
    for metric, spec in metrics.items():
        log(f"Figure 7 ({spec.label}): {len(blocks)} block sizes x {len(curves)} curves, one compiled program")
        series = sweep.block_sweep(model, blocks, lambda m, spec=spec: spec.measure(quantize.materialize(m)),
                                   super_weights=sws, bits=FLAGS.bits, clip=FLAGS.clip_method,
                                   clip_threshold=FLAGS.clip_threshold, curves=curves,
                                   on_point=lambda c, b, v, spec=spec: log(f"  {c}, block {b}: {spec.label} {v:.3f}"))
        reference = spec.measure(model)
        log(f"  unquantized: {spec.label} {reference:.3f}")
        result[metric] = {"unquantized": reference, **series, **spec.settings}
        path = common.figure(out, "block_sweep" + spec.suffix)
        plots.block_sweep(labels, series, f"{common.model_name()}: INT{FLAGS.bits} round-to-nearest by block "
                          f"size ({spec.label})", path, ylabel=spec.label, log_y=spec.log_y, reference=reference)
    return result


def figure7_markdown(result: dict, metric: str) -> str:
    """One metric of Figure 7 as a table: block sizes down, curves across, and how many tensors each block size
    quantizes whole.

    Args:
      result: `figure7`'s result.
      metric: "perplexity" or "zeroshot".

    Returns:
      The table in Markdown.
    """
    series = {k: v for k, v in result[metric].items() if k in defaults.CURVES}
    rows = [[b, *(f"{s[i]:.3f}" for s in series.values()), result["whole_tensor_fallback"][b]]
            for i, b in enumerate(result["blocks"])]
    return common.markdown_table(["block", *series, "tensors quantized whole"], rows)


def main(argv):
    """Run the --parts, print their tables and write quantize.json, table3.md, figure7.md and the figures.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/quantize")  # unwritable: fails before the model loads
    zeroshot = zeroshot_flags.evaluator() if "zeroshot" in FLAGS.metrics and "figure7" in FLAGS.parts else None
    model, tokenizer = common.load_model()
    corpora = common.load_corpora(FLAGS.datasets, tokenizer, FLAGS.max_chunks)
    payload = {"model": FLAGS.model, "seqlen": FLAGS.seqlen}
    if "table3" in FLAGS.parts:
        payload["table3"] = table3(model, tokenizer, corpora)
        text = table3_markdown(payload["table3"], corpora)
        print(f"\nTable 3 ({FLAGS.model}, W{FLAGS.w_bits}A{FLAGS.a_bits}, weights per {FLAGS.weight_block}, "
              f"activations per {FLAGS.act_granularity}; % of SmoothQuant's gain over naive W8A8):\n{text}")
        (out / "table3.md").write_text(text + "\n")
    if "figure7" in FLAGS.parts:
        payload["figure7"] = figure7(model, tokenizer, corpora, zeroshot, out)
        parts = []
        for metric in FLAGS.metrics:
            text = figure7_markdown(payload["figure7"], metric)
            print(f"\nFigure 7 ({metric}; unquantized {payload['figure7'][metric]['unquantized']:.3f}):\n{text}")
            parts.append(f"{metric}:\n\n{text}\n")
        (out / "figure7.md").write_text("\n".join(parts))
    common.write_json(out / "quantize.json", payload)
    print(f"\nwrote quantize.json, the tables and the figures in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
