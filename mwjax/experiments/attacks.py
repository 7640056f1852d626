"""House of Cards Table 1 and Figure 4 for any model: find the massive weights, attack them, measure.

    python -m experiments.attacks                                  # the embedded SmolLM2, protocol settings
    python -m experiments.attacks --seqlen=512 --max_chunks=8      # quick, CPU-sized
    python -m experiments.attacks --model=PATH --datasets=wikitext2,c4,pg19   # with hub access

Settings: the original model, top-k zeroing, top-k retaining, and (Massive Activations, Table 4.3)
the massive activations of the origin layer's hidden state set to zero / to their mean. For each:
perplexity on every corpus (the massive-activations protocol: --seqlen 4096, all WikiText chunks,
100 of C4 / PG-19) and a greedy generation per prompt, so a reader sees what the attack does.
Then Figure 4's sweep over k for both attacks: every point runs the same compiled program (the
attack is a traced row mask over the layer), measured as perplexity on the first corpus and, with
--sweep_metrics=perplexity,zeroshot, as the paper plots it: mean zero-shot accuracy over --tasks
(lm-eval; --data_dir for local task files, as experiments.zeroshot). Zero-shot accuracy of Table 1's
settings comes from `experiments.zeroshot --attack=...`.

Writes attacks.json, table1.md, k_sweep.png (and k_sweep_zeroshot.png; --format=pdf|svg for vector
figures) under --output_dir.
"""

from __future__ import annotations

import numpy as np
from absl import flags

from mwjax.core import cli, lazy
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots, zeroshot_flags
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
attacks = lazy.module("mwjax.research.attacks")
massive = lazy.module("mwjax.research.massive")
decoding = lazy.module("mwjax.eval.decoding")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(zeroshot_flags)
flags.DEFINE_integer("k", 5, "top-k massive weights to attack", lower_bound=1)
flags.DEFINE_list("datasets", ["python_docs"], "corpora: wikitext2, c4, pg19 (hub), python_docs (embedded) or paths")
common.check_flag("datasets", check_corpus)
flags.DEFINE_integer("seqlen", 4096, "tokens per perplexity chunk (the protocol's 4096)", lower_bound=2)
flags.DEFINE_integer("max_chunks", None, "cap on chunks per corpus (beyond the protocol's own cap)", lower_bound=1)
flags.DEFINE_integer("batch_size", 1, "chunks per forward pass", lower_bound=1)
cli.define_numbers("sweep", [0, 1, 2, 3, 5, 10], "k values of the Figure 4 sweep (empty: skip)", lower_bound=0)
flags.DEFINE_list("sweep_metrics", ["perplexity"], "what the sweep reports: perplexity (the first corpus) and/or "
                  "zeroshot (mean zero-shot accuracy over --tasks, Figure 4's metric)")
common.check_flag("sweep_metrics", zeroshot_flags.check_metric)
flags.DEFINE_integer("sweep_chunks", None, "a further cap on the first corpus's chunks per sweep point (default: the "
                     "run's own, so the k=0 zeroing point equals 'original')", lower_bound=1)
flags.DEFINE_bool("activation_interventions", True, "also set the massive activations to zero / their mean")
flags.DEFINE_string("calibration", defaults.CALIBRATION_CORPUS, "corpus whose LAST chunks give the massive-activation "
                    "means (kept apart from the evaluated text, as the thesis' 100 RedPajama sequences)")
common.check_flag("calibration", check_corpus)
flags.DEFINE_integer("calibration_sequences", defaults.CALIBRATION_SEQUENCES, "calibration sequences (the thesis: 100)",
                     lower_bound=1)
flags.DEFINE_integer("calibration_seqlen", defaults.CALIBRATION_SEQLEN, "tokens per calibration sequence (with bos)",
                     lower_bound=1)
flags.DEFINE_list("prompts", ["What is the capital of France?", "Write a short poem about the sea."],
                  "generation prompts (user turns of the chat template when the tokenizer has one)")
flags.DEFINE_integer("max_new_tokens", 40, "tokens generated per prompt", lower_bound=1)


def settings(model, mw: massive.MassiveWeights, calibration: np.ndarray) -> dict:
    """Table 1's settings at --k (`attacks.table1_settings`), printing the massive activations found.

    Args:
      model: the original mwjax model.
      mw: its massive weights (`massive.find_massive_weights`).
      calibration: int [sequences, seqlen] bos-led token ids for the massive-activation means; used only with
        --activation_interventions.

    Returns:
      name -> attacked model (each a copy sharing the original's arrays).
    """
    out, ma = attacks.table1_settings(model, mw, FLAGS.k, calibration if FLAGS.activation_interventions else None)
    if ma is not None:
        print(f"massive activations after {mw.label}: dims {list(ma.dims)} at positions {list(ma.positions)[:8]} "
              f"(|x| > {ma.threshold:.0f})")
    return out


def sweep(model, mw, ks: list[int], measure) -> dict[str, list[float]]:
    """Figure 4 (`attacks.k_sweep`), each point printed.

    Args:
      model: the original mwjax model.
      mw: its massive weights (`massive.MassiveWeights`).
      ks: the k values swept.
      measure: attacked model -> float (perplexity or mean zero-shot accuracy).

    Returns:
      "top-k zeroing" / "top-k retaining" -> one value per k.
    """
    return attacks.k_sweep(model, mw, ks, measure,
                           on_point=lambda name, k, value: print(f"   {name}, k={k}: {value:.2f}", flush=True))


def print_sweep(ks: list[int], series: dict[str, list[float]], metric: str) -> None:
    """Print a Figure 4 sweep as a Markdown table: one row per k, one column per attack.

    Args:
      ks: the k values swept.
      series: attack name -> one value per k (from `sweep`).
      metric: what the values are, for the title.
    """
    print(f"\nFigure 4 sweep ({metric}):")
    rows = [[k, *(s[i] for s in series.values())] for i, k in enumerate(ks)]
    print(common.markdown_table(["k"] + list(series), rows))


def main(argv):
    """Find --model's massive weights, measure Table 1's settings and Figure 4's sweep, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/attacks")  # unwritable: fails before the model loads
    zeroshot = zeroshot_flags.evaluator() if "zeroshot" in FLAGS.sweep_metrics and FLAGS.sweep else None
    model, tokenizer = common.load_model()
    ks = [int(k) for k in FLAGS.sweep]
    mw = massive.find_massive_weights(model, tokenizer, k=max([FLAGS.k, *ks]), first_token=common.first_token_flag())
    print(f"massive weights: {mw.label}, top-{FLAGS.k} rows {list(mw.indices[:FLAGS.k])} "
          f"(intermediate values {[round(v, 1) for v in mw.values[:FLAGS.k]]}, median |x| {mw.median:.3g})\n")

    corpora = common.load_corpora(FLAGS.datasets, tokenizer, FLAGS.max_chunks)
    calibration = (common.calibration_set(corpora, tokenizer, FLAGS.calibration, FLAGS.calibration_sequences,
                                          FLAGS.calibration_seqlen, FLAGS.seqlen)
                   if FLAGS.activation_interventions else None)
    chat = getattr(tokenizer, "chat_template", None) is not None
    rows, results = [], {}
    for name, attacked in settings(model, mw, calibration).items():
        ppl = {c.name: likelihood.perplexity(attacked, c.token_ids, FLAGS.seqlen, max_chunks=c.max_chunks,
                                             batch_size=FLAGS.batch_size).to_dict() for c in corpora}
        samples = decoding.generate_text(attacked, tokenizer, FLAGS.prompts, FLAGS.max_new_tokens, chat=chat)
        results[name] = {"perplexity": ppl, "generations": dict(zip(FLAGS.prompts, samples, strict=True))}
        rows.append([name] + [ppl[c.name]["perplexity"] for c in corpora])
        print(f"== {name}: " + ", ".join(f"{c} PPL {r['perplexity']:.2f}" for c, r in ppl.items()))
        for prompt, text in zip(FLAGS.prompts, samples, strict=True):
            print(f"   {prompt!r} -> {text!r}")

    table = common.markdown_table(["setting"] + [f"{c.name} PPL" for c in corpora], rows)
    print(f"\nTable 1 ({FLAGS.model}, {mw.label}, seqlen {FLAGS.seqlen}):\n{table}")
    (out / "table1.md").write_text(table + "\n")
    payload = {"model": FLAGS.model, "massive_weights": mw.to_dict(), "k": FLAGS.k, "seqlen": FLAGS.seqlen,
               "settings": results}
    if ks:
        caps = [c for c in (corpora[0].max_chunks, FLAGS.sweep_chunks) if c is not None]
        tokens = likelihood.chunk_tokens(corpora[0].token_ids, FLAGS.seqlen, min(caps) if caps else None)
        metrics = zeroshot_flags.sweep_metrics(
            FLAGS.sweep_metrics, tokenizer, zeroshot, f"{corpora[0].name} perplexity",
            lambda m: likelihood.perplexity(m, tokens, FLAGS.seqlen, batch_size=FLAGS.batch_size).perplexity,
            {"corpus": corpora[0].name, "chunks": len(tokens)})
        for metric in metrics.values():
            series = sweep(model, mw, ks, metric.measure)
            plots.k_sweep(ks, series, f"{common.model_name()}: {metric.label}, {mw.label} attacked",
                          common.figure(out, "k_sweep" + metric.suffix), ylabel=metric.label, log_y=metric.log_y)
            payload["k_sweep" + metric.suffix] = {"k": ks, **metric.settings, **series}
            print_sweep(ks, series, metric.label)
    common.write_json(out / "attacks.json", payload)
    print(f"\nwrote attacks.json, table1.md and figures in {common.publish(out)}")


if __name__ == "__main__":
    cli.run(main)
