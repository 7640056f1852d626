"""Wanda and magnitude pruning (Sun et al., thesis chapter 3) against the massive weights: how many of the top-k
massive weights and super weights each method removes, and what protecting them does to perplexity.

    python -m experiments.prune --model=PATH                       # the thesis: 128 x 2048 C4 calibration, WikiText
    python -m experiments.prune --calibration=python_docs --calibration_sequences=16 --calibration_seqlen=512 \\
        --datasets=python_docs --seqlen=512 --max_chunks=16      # the embedded SmolLM2, offline and CPU-sized

For each --sparsities (50% unstructured, N:M such as 2:4 / 4:8) x --methods (wanda: |W| * ||X||_2 per output
row from calibration activations, layer by layer as the Wanda repository's `prune_wanda`; magnitude: |W| per
matrix, the repository's baseline; magnitude_global: one threshold over the model) x --protect (none; massive =
the top --k massive rows of W_gate / W_up and the super weights kept; rows; super_weights), the pruned model's
perplexity, its actual sparsity, how many entries of the top-k massive rows and how many super weights it
pruned, and the first token's massive intermediate values that are left. Masks are functional
(`mwjax.research.prune`): the loaded weights are never modified.

Writes prune.json, prune.md (the table) and prune.png (--format=pdf|svg) under --output_dir.
"""

from __future__ import annotations

from absl import flags

from mwjax.core import cli, lazy
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
massive = lazy.module("mwjax.research.massive")
prune = lazy.module("mwjax.research.prune")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(common)
flags.DEFINE_list("methods", ["wanda", "magnitude"], f"pruning methods: {', '.join(defaults.PRUNE_METHODS)}")
common.check_flag("methods", lambda method: prune.check_method(method))
flags.DEFINE_list("sparsities", ["0.5", "4:8", "2:4"], "sparsities: a fraction (unstructured) or N:M (thesis Table "
                  "3.3: 50%, 4:8, 2:4)")
common.check_flag("sparsities", lambda sparsity: prune.parse_sparsity(sparsity))
PROTECT = {"none": (False, False), "massive": (True, True), "rows": (True, False), "super_weights": (False, True)}
flags.DEFINE_list("protect", ["none", "massive"], "protection settings to compare: none; massive (the top --k massive "
                  "rows of W_gate / W_up and the super weights); rows; super_weights")


def check_protect(name: str) -> None:
    """Check a --protect setting: ValueError unless it is one of `PROTECT`.

    Args:
      name: the protection setting (none, massive, rows or super_weights).
    """
    if name not in PROTECT:
        raise ValueError(f"unknown protection {name!r}; choose from {sorted(PROTECT)}")


common.check_flag("protect", check_protect)
flags.DEFINE_integer("k", 5, "top-k massive weights (rows of W_gate and W_up) to count and protect", lower_bound=1)
flags.DEFINE_string("calibration", "c4", "corpus whose LAST chunks calibrate Wanda (thesis: C4 training text); a "
                    "corpus name or a local text file")
common.check_flag("calibration", check_corpus)
flags.DEFINE_integer("calibration_sequences", 128, "calibration sequences (thesis: 128)", lower_bound=1)
flags.DEFINE_integer("calibration_seqlen", 2048, "tokens per calibration sequence (thesis: 2048, LLaMA's context)",
                     lower_bound=1)
flags.DEFINE_bool("calibration_bos", False, "start each calibration sequence with the bos token (the Wanda "
                  "repository's C4 windows start mid-document, without one)")
flags.DEFINE_integer("calibration_batch_size", 8, "calibration sequences per forward pass", lower_bound=1)
flags.DEFINE_bool("sequential", True, "Wanda: each layer calibrated on the outputs of the layers before it as pruned "
                  "(the reference), not of the dense model")
flags.DEFINE_list("datasets", ["wikitext2"], "corpora: wikitext2 (thesis), c4, pg19 (hub), python_docs (embedded) or "
                  "paths")
common.check_flag("datasets", check_corpus)
flags.DEFINE_integer("seqlen", 2048, "tokens per perplexity chunk (the Wanda repository evaluates at 2048)",
                     lower_bound=2)
flags.DEFINE_integer("max_chunks", None, "cap on chunks per corpus", lower_bound=1)
flags.DEFINE_integer("batch_size", 1, "chunks per forward pass", lower_bound=1)


def evaluate(model, corpora) -> dict[str, float]:
    """Perplexity of `model` on each corpus, at --seqlen and --batch_size.

    Args:
      model: the dense or pruned mwjax model.
      corpora: the `corpora.Corpus` list evaluated (each with its chunk cap).

    Returns:
      {corpus name: perplexity}.
    """
    return {c.name: likelihood.perplexity(model, c.token_ids, FLAGS.seqlen, max_chunks=c.max_chunks,
                                          batch_size=FLAGS.batch_size).perplexity for c in corpora}


def main(argv):
    """Prune --model by each method, sparsity and protection, measure what each removes, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/prune")  # unwritable: fails before the model loads
    model, tokenizer = common.load_model()
    mw = massive.find_massive_weights(model, tokenizer, k=FLAGS.k, first_token=common.first_token_flag())
    sws = massive.find_super_weights(model, tokenizer) if model.config.num_local_experts is None else []
    print(f"massive weights: {mw.label}, top-{FLAGS.k} rows {list(mw.indices)} (bos intermediate values "
          f"{[round(v, 1) for v in mw.values]}); super weights: {[sw.label for sw in sws] or 'none found'}")
    corpora = common.load_corpora(FLAGS.datasets, tokenizer, FLAGS.max_chunks)
    calibration = None
    if "wanda" in FLAGS.methods:
        calibration = common.calibration_set(corpora, tokenizer, FLAGS.calibration, FLAGS.calibration_sequences,
                                             FLAGS.calibration_seqlen, FLAGS.seqlen, bos=FLAGS.calibration_bos)
    dense = evaluate(model, corpora)
    print("== dense: " + ", ".join(f"{c} PPL {v:.2f}" for c, v in dense.items()))
    protections = {name: prune.protected(model, mw if rows else None, FLAGS.k, sws if supers else ())
                   for name, (rows, supers) in PROTECT.items() if name in FLAGS.protect}
    dense_values = mw.values[:FLAGS.k]
    settings, rows = [], []
    for spec in FLAGS.sparsities:
        sparsity = prune.parse_sparsity(spec)
        for method in FLAGS.methods:
            if method == "magnitude_global" and sparsity.structured:
                print(f"-- magnitude_global at {sparsity.label}: skipped (global magnitude pruning is unstructured)")
                continue
            for name, protect in protections.items():
                masks = prune.masks_for(model, method, sparsity, calibration=calibration, protect=protect,
                                        sequential=FLAGS.sequential, batch_size=FLAGS.calibration_batch_size)
                pruned = prune.apply(model, masks)
                ppl = evaluate(pruned, corpora)
                hit = prune.removed(masks, mw, FLAGS.k, sws)
                left = prune.massive_values(pruned, mw, FLAGS.k)
                setting = {"method": method, "sparsity": sparsity.label, "protect": name,
                           "actual_sparsity": prune.sparsity_of(masks), "perplexity": ppl, "removed": hit,
                           "massive_values_left": left,
                           "massive_value_ratio": [a / b for a, b in zip(left, dense_values, strict=True)]}
                settings.append(setting)
                rows_hit, sw_hit = hit["massive_rows"], hit.get("super_weights")
                rows.append([method, sparsity.label, name, f"{setting['actual_sparsity']['overall']:.2%}",
                             *(ppl[c.name] for c in corpora),
                             f"{rows_hit['entries_pruned']} / {rows_hit['entries']}",
                             f"{sw_hit['pruned']} / {sw_hit['count']}" if sw_hit else "-",
                             setting["massive_value_ratio"][0]])
                print(f"== {method} {sparsity.label}, protect {name}: " + ", ".join(
                    f"{c} PPL {v:.2f}" for c, v in ppl.items()) + f"; massive-row entries pruned {rows[-1][-3]}, "
                    f"super weights pruned {rows[-1][-2]}, bos top-1 value {left[0]:.1f} (dense {dense_values[0]:.1f})",
                    flush=True)

    header = ["method", "sparsity", "protected", "actual sparsity", *(f"{c.name} PPL" for c in corpora),
              f"top-{FLAGS.k} massive-row entries pruned", "super weights pruned", "bos top-1 value left"]
    table = common.markdown_table(header, [["dense", "0%", "-", "0.00%", *dense.values(), "0", "0", 1.0]] + rows)
    print(f"\n{common.model_name()}: pruning against the massive weights ({mw.label})\n{table}")
    (out / "prune.md").write_text(table + "\n")
    first = corpora[0].name
    labels = list(dict.fromkeys(f"{s['method']} {s['sparsity']}" for s in settings))
    pick = lambda label, protect, f: next(f(s) for s in settings
                                          if f"{s['method']} {s['sparsity']}" == label and s["protect"] == protect)
    reference = "none" if "none" in protections else next(iter(protections))
    plots.pruning_summary(
        labels, {f"protect: {p}": [pick(lb, p, lambda s: s["perplexity"][first]) for lb in labels]
                 for p in protections}, dense[first],
        [pick(lb, reference, lambda s: s["removed"]["massive_rows"]["fraction_pruned"]) for lb in labels],
        [pick(lb, reference, lambda s: s["massive_value_ratio"][0]) for lb in labels],
        f"{common.model_name()}: pruning vs. massive weights ({first} perplexity, {mw.label})",
        common.figure(out, "prune"))
    payload = {"model": FLAGS.model, "massive_weights": mw.to_dict(), "super_weights": [sw.to_dict() for sw in sws],
               "k": FLAGS.k, "seqlen": FLAGS.seqlen, "dense": dense,
               "calibration": None if calibration is None else {
                   "corpus": FLAGS.calibration, "sequences": len(calibration), "seqlen": FLAGS.calibration_seqlen,
                   "bos": FLAGS.calibration_bos, "sequential": FLAGS.sequential},
               "settings": settings}
    common.write_json(out / "prune.json", payload)
    print(f"\nwrote prune.json, prune.md and the figure in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
