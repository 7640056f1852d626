"""The Super Weight, Table 1, Figures 3 / 10, 4, 2 III / 11 and 8 for any model: detect, trace, prune,
prune + restore, scale.

    python -m experiments.super_weight --seqlen=512 --max_chunks=8      # the embedded SmolLM2, CPU-sized
    python -m experiments.super_weight --model=PATH --datasets=wikitext2,c4

Detection runs the reference prompt through down_proj and looks for layers whose input and output both spike
above --threshold (default 50). By default as the paper's §3.1 does (--detection=paper,
`massive.find_super_weights_iteratively`): the earliest spiking layer's weight (argmax row and column) is taken and
pruned and the prompt scanned again, until no layer before the last eighth spikes; spikes left in the late layers are
reported, not attacked. On the embedded SmolLM2 this finds layers[2]'s [507, 90] alone: the spikes at layers 9 and 11
vanish once it is pruned (they carried its super activation), and layers 27-29 are late. --detection=every_spike
takes every spiking layer at once, with every row whose contribution reaches --ratio of the largest output
(`massive.find_super_weights`: 8 weights in 6 layers on SmolLM2). All are attacked jointly, as the paper does for
models with several (Llama-3-8B), unless --layer/--row/--col name one. Then perplexity
for: the original model, the super weights pruned, pruned with their super activations restored, the
--non_super_weights largest other weights pruned instead (Table 1's "Prune Non-SW"; every super weight found is
kept), and the weights scaled by each of --factors, measured as perplexity on the first corpus and, with
--scaling_metrics=perplexity,zeroshot, as the paper's Figure 8 plots it: mean zero-shot accuracy over
--tasks (lm-eval; --data_dir for local task files, as experiments.zeroshot).

The mechanism (`mwjax.research.super_mechanism`): Figures 3 / 10, the max |down_proj input| and |output| per layer
on --prompt (detection's own signal); Figure 4, the super activation (the hidden state at the super weight's row
and token) after every layer, with the super weights and pruned; Figure 2 III / 11, the mean next-token
probability mass on stopwords (`mwjax.data.stopwords`) and on the other tokens over the first corpus' chunks,
before and after pruning, and the tokens whose probability rises most.
Writes super_weight.json, down_proj_maxima.png, super_activation.png, stopwords.png, scaling.png (and
scaling_zeroshot.png; --format=pdf|svg) under --output_dir.
"""

from __future__ import annotations

from absl import flags

from mwjax.core import cli, lazy
from mwjax.data import stopwords
from mwjax.data.corpora import check_name as check_corpus
from mwjax.experiments import common, plots, zeroshot_flags
from mwjax.research import defaults

# what needs jax (or matplotlib) loads after the flags are parsed: --help answers without it
attacks = lazy.module("mwjax.research.attacks")
prune = lazy.module("mwjax.research.prune")
massive = lazy.module("mwjax.research.massive")
super_mechanism = lazy.module("mwjax.research.super_mechanism")
decoding = lazy.module("mwjax.eval.decoding")
likelihood = lazy.module("mwjax.eval.likelihood")

FLAGS = flags.FLAGS
DETECTIONS = ("paper", "every_spike")
# --help lists the shared flags (--model, --output_dir, ...) too, not only under --helpfull
flags.adopt_module_key_flags(common)
flags.adopt_module_key_flags(zeroshot_flags)
flags.DEFINE_string("prompt", defaults.DEFAULT_PROMPT, "prompt that detection runs")
cli.define_float("threshold", defaults.SPIKE_THRESHOLD, "spike threshold on |down_proj input| and |output|",
                    above=0)
cli.define_float("ratio", defaults.SUPER_RATIO, "a further row of a spiking layer is a super weight when its own "
                   "contribution reaches this fraction of the largest |output| (research.massive module doc)", above=0,
                    upper_bound=1)
flags.DEFINE_enum("detection", "paper", list(DETECTIONS), "how super weights are found: paper (The Super Weight "
                  "§3.1: the earliest spiking layer's weight, pruned, the prompt scanned again, until no layer before "
                  "the last eighth spikes; late spikes reported, not attacked) or every_spike (every spiking layer at "
                  "once, further rows by --ratio)")
flags.DEFINE_integer("layer", None, "super weight layer (0-based), with --row and --col, instead of detection",
                     lower_bound=0)
flags.DEFINE_integer("row", None, "down_proj.weight row (output channel)", lower_bound=0)
flags.DEFINE_integer("col", None, "down_proj.weight column (input channel)", lower_bound=0)
flags.DEFINE_integer("non_super_weights", defaults.NON_SUPER_WEIGHTS, "Table 1's control: prune this many of the "
                     "largest-magnitude decoder weights other than the super weights (the paper's 7,000; 0: skip)",
                     lower_bound=0)
flags.DEFINE_list("scaling_metrics", ["perplexity"], "what the scaling sweep reports: perplexity (the first "
                  "corpus) and/or zeroshot (mean zero-shot accuracy over --tasks, Figure 8's metric)")
common.check_flag("scaling_metrics", zeroshot_flags.check_metric)
cli.define_numbers("factors", [0.0, 0.2, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0], "scaling factors", float)
flags.DEFINE_list("datasets", ["python_docs"], "corpora: wikitext2, c4, pg19 (hub), python_docs (embedded) or paths")
common.check_flag("datasets", check_corpus)
flags.DEFINE_integer("seqlen", 4096, "tokens per perplexity chunk", lower_bound=2)
flags.DEFINE_integer("max_chunks", None, "cap on chunks per corpus", lower_bound=1)
flags.DEFINE_integer("batch_size", 1, "chunks per forward pass", lower_bound=1)
flags.DEFINE_string("generation_prompt", "What is the capital of France?", "prompt for a sample per setting")

RISING_TOKENS = 10  # Figure 11: the tokens whose mean probability rises most after pruning, listed


def _all_or_none(values: dict) -> bool:
    """--layer, --row and --col name one weight together: refused at parsing (before the model loads) unless all
    three or none are given."""
    given = [f"--{name}" for name, value in values.items() if value is not None]
    if given and len(given) < 3:
        raise flags.ValidationError(f"{' and '.join(given)} without the rest: --layer, --row and --col name one "
                                    "down_proj weight together (or give none: detection chooses)")
    return True


flags.register_multi_flags_validator(["layer", "row", "col"], _all_or_none)


def choose(model, prompt, spikes) -> tuple[list[massive.SuperWeight], list[massive.SuperWeight]]:
    """The super weights to attack: all that --detection finds on --prompt, or the one named by --layer/--row/--col.

    SystemExit when detection finds none and none is named (--layer, --row and --col come together: `_all_or_none`).

    Args:
      model: an mwjax causal LM.
      prompt: int [1, seq] the detection prompt's tokens.
      spikes: its down_proj spikes on --prompt (`massive.down_proj_spikes`), where every_spike detection looks.

    Returns:
      (the super weights to attack jointly, every one detection found).
    """
    if FLAGS.detection == "paper":
        detection = massive.find_super_weights_iteratively(model, tokens=prompt, threshold=FLAGS.threshold)
        candidates = list(detection.super_weights)
        print(f"paper detection: {detection.rounds} scans; spikes in the late layers ({detection.late_from} on), "
              "reported, not attacked: " + (", ".join(f"{sw.label} (input {sw.input_value:.1f}, output "
                                                      f"{sw.output_value:.1f})" for sw in detection.late_spikes)
                                            or "none"))
    else:
        candidates = massive.super_weights_from_spikes(model, spikes, threshold=FLAGS.threshold, ratio=FLAGS.ratio)
    if FLAGS.layer is not None:
        return [massive.super_weight_at(model, FLAGS.layer, FLAGS.row, FLAGS.col)], candidates
    if not candidates:
        raise SystemExit(f"no layer's down_proj spikes above {FLAGS.threshold} on this prompt; lower --threshold "
                         "or name the weight with --layer/--row/--col")
    return candidates, candidates


def main(argv):
    """Find --model's super weights, measure pruning, restoring and scaling them, write the results.

    Args:
      argv: the command line as absl passes it (flags already parsed); unused.
    """
    del argv
    out = common.output_dir("outputs/super_weight")  # unwritable: fails before the model loads
    zeroshot = zeroshot_flags.evaluator() if "zeroshot" in FLAGS.scaling_metrics else None
    model, tokenizer = common.load_model()
    prompt = massive.prompt_tokens(tokenizer, FLAGS.prompt)
    spikes = massive.down_proj_spikes(model, prompt)  # Figures 3 / 10, and what detection reads
    sws, candidates = choose(model, prompt, spikes)
    print(f"super weights found (spike > {FLAGS.threshold:g}, further rows from {FLAGS.ratio:g} of the largest):")
    print(common.markdown_table(["layer", "coordinates", "weight", "input spike", "output spike"],
                                [[c.layer, c.label, c.weight, c.input_value, c.output_value] for c in candidates]))
    print("\nattacking jointly: " + ", ".join(f"{sw.label} = {sw.weight:.4g}" for sw in sws) + "\n")
    name = common.model_name()
    pruned = attacks.scale_super_weight(model, sws, 0.0)
    mechanism = {"down_proj_maxima": down_proj_maxima(spikes, [*sws, *candidates], name, out),
                 "super_activation": super_activation(model, prompt, sws, pruned, name, out)}

    corpora = common.load_corpora(FLAGS.datasets, tokenizer, FLAGS.max_chunks)
    chat = getattr(tokenizer, "chat_template", None) is not None

    def evaluate(name, attacked):
        ppl = {c.name: likelihood.perplexity(attacked, c.token_ids, FLAGS.seqlen, max_chunks=c.max_chunks,
                                             batch_size=FLAGS.batch_size).perplexity for c in corpora}
        sample = decoding.generate_text(attacked, tokenizer, [FLAGS.generation_prompt], 30, chat=chat)[0]
        print(f"== {name}: " + ", ".join(f"{c} PPL {v:.2f}" for c, v in ppl.items()) + f"\n   -> {sample!r}")
        return {"perplexity": ppl, "generation": sample}

    results = {"original": evaluate("original", model),
               "prune SW": evaluate("prune SW", pruned),
               "prune SW, +SA": evaluate("prune SW, +SA", attacks.restore_super_activation(model, sws))}
    if FLAGS.non_super_weights:
        results["prune Non-SW"] = evaluate(f"prune Non-SW ({FLAGS.non_super_weights} largest others)",
                                           prune.prune_largest_weights(model, FLAGS.non_super_weights,
                                                                       exclude=[*sws, *candidates]))
    first = corpora[0]
    mechanism["stopwords"] = stopword_likelihoods(model, pruned, tokenizer, first, name, out)
    factors = [float(f) for f in FLAGS.factors]
    title = f"{name}: {sws[0].label}" + (f" and {len(sws) - 1} more" if len(sws) > 1 else "")
    payload = {"model": FLAGS.model, "super_weights": [sw.to_dict() for sw in sws],
               "candidates": [c.to_dict() for c in candidates], "settings": results, **mechanism,
               "scaling": {"factors": factors}}
    metrics = zeroshot_flags.sweep_metrics(
        FLAGS.scaling_metrics, tokenizer, zeroshot, f"{first.name} PPL",
        lambda m: likelihood.perplexity(m, first.token_ids, FLAGS.seqlen, max_chunks=first.max_chunks,
                                        batch_size=FLAGS.batch_size).perplexity, {"corpus": first.name})
    for metric, sweep in metrics.items():
        values = []
        for f in factors:
            values.append(sweep.measure(attacks.scale_super_weight(model, sws, f)))
            print(f"   factor {f:g}: {sweep.label} {values[-1]:.2f}", flush=True)
        print(f"\nscaling the super weight ({sweep.label}):")
        print(common.markdown_table(["factor", sweep.label], [[f, v] for f, v in zip(factors, values, strict=True)]))
        plots.scaling_curve(factors, values, title, common.figure(out, "scaling" + sweep.suffix), ylabel=sweep.label,
                            log_y=sweep.log_y)
        payload["scaling"][metric] = values
        payload["scaling"][f"{metric}_settings"] = sweep.settings
    common.write_json(out / "super_weight.json", payload)
    print(f"\nwrote super_weight.json and figures in {common.publish(out)}")


def down_proj_maxima(spikes, marked, name: str, out) -> dict:
    """Figures 3 / 10: print and plot the per-layer max |down_proj input| and |output| on --prompt.

    Args:
      spikes: the `massive.DownProjSpikes` on --prompt.
      marked: super weights (attacked or found) whose layers are marked.
      name: the model's name, for the title.
      out: the output directory.

    Returns:
      The JSON entry: the spikes (`DownProjSpikes.to_dict`) and the marked layers.
    """
    layers = sorted({sw.layer for sw in marked})
    print("Figures 3 / 10: max |down_proj input| and |output| per layer on the detection prompt (* super weight "
          "layer):")
    print(common.markdown_table(
        ["layer", "max |input|", "channel (col)", "max |output|", "channel (row)", "token"],
        [[f"{layer}{' *' if layer in layers else ''}", float(abs(spikes.input.value[layer])),
          int(spikes.input.channel[layer]), float(abs(spikes.output.value[layer])), int(spikes.output.channel[layer]),
          int(spikes.output.position[layer])] for layer in range(len(spikes.input.value))]))
    plots.down_proj_maxima(spikes, f"{name}: max |down_proj input| / |output| per layer (Figures 3, 10)",
                           common.figure(out, "down_proj_maxima"), mark_layers=layers)
    return spikes.to_dict() | {"super_weight_layers": layers}


def super_activation(model, prompt, sws, pruned, name: str, out) -> list[dict]:
    """Figure 4: print and plot the super activations after every layer, with the super weights and pruned.

    Args:
      model: the mwjax causal LM.
      prompt: int [1, seq] the detection prompt's tokens.
      sws: the super weights attacked.
      pruned: `model` with `sws` pruned.
      name: the model's name, for the title.
      out: the output directory.

    Returns:
      The JSON entry: one `SuperActivationTrace.to_dict` per trace.
    """
    traces = super_mechanism.super_activation_traces(model, prompt, sws, attacked=pruned)
    print("\nFigure 4: |hidden state| at the super activation (channel, token) after each layer, original / SW "
          "pruned:")
    print(common.markdown_table(
        ["layer", *(f"ch {t.row} tok {t.position}: {kind}" for t in traces for kind in ("original", "pruned"))],
        [[layer, *(float(abs(v)) for t in traces for v in (t.original[layer], t.pruned[layer]))]
         for layer in range(len(traces[0].original))]))
    for t in traces:
        print(f"   channel {t.row}, token {t.position}: pruning lowers it by {100 * t.drop:.1f}% right after layer "
              f"{t.layer}, by {100 * t.mean_drop:.1f}% over layers {t.layer}..{len(t.original) - 1} (paper: ~75%; "
              "negative: raises it)")
    plots.super_activation(traces, f"{name}: the super activation through the layers (Figure 4)",
                           common.figure(out, "super_activation"))
    return [t.to_dict() for t in traces]


def stopword_likelihoods(model, pruned, tokenizer, corpus, name: str, out) -> dict:
    """Figure 2 III / 11: print and plot the stopword and other-token probability mass, original and SW pruned.

    Args:
      model: the mwjax causal LM.
      pruned: `model` with its super weights pruned.
      tokenizer: its tokenizer.
      corpus: the corpus whose chunks (--seqlen, its chunk cap) are averaged over.
      name: the model's name, for the title.
      out: the output directory.

    Returns:
      The JSON entry: `StopwordShift.to_dict` with the list, corpus and chunks named.
    """
    chunks = likelihood.chunk_tokens(corpus.token_ids, FLAGS.seqlen, corpus.max_chunks)
    shift = super_mechanism.stopword_shift(model, pruned, chunks, tokenizer, top_k=RISING_TOKENS,
                                           batch_size=FLAGS.batch_size)
    print(f"\nFigure 2 III / 11: mean next-token probability mass on {corpus.name} ({len(chunks)}x{FLAGS.seqlen}), "
          f"stopwords = {stopwords.NAME} ({len(stopwords.STOPWORDS)} words, {shift.stopword_tokens} tokens):")
    print(common.markdown_table(["tokens", "original", "SW pruned", "after / before"],
                                [["stopwords", f"{shift.stopword_before:.4f}", f"{shift.stopword_after:.4f}",
                                  f"{shift.stopword_ratio:.3f}"],
                                 ["other tokens", f"{shift.other_before:.4f}", f"{shift.other_after:.4f}",
                                  f"{shift.other_ratio:.3f}"]]))
    print("\ntokens whose mean probability rises most after pruning (* stopword):")
    print(common.markdown_table(["token", "id", "original", "SW pruned"],
                                [[repr(t.text) + (" *" if t.stopword else ""), t.token_id, f"{t.before:.4f}",
                                  f"{t.after:.4f}"] for t in shift.rising]))
    plots.stopword_shift(shift, f"{name}: next-token probability on {corpus.name}, super weights pruned "
                         "(Figures 2 III, 11)", common.figure(out, "stopwords"))
    return shift.to_dict() | {"list": stopwords.NAME, "words": len(stopwords.STOPWORDS), "corpus": corpus.name,
                              "chunks": len(chunks), "seqlen": FLAGS.seqlen}


if __name__ == "__main__":
    cli.run(main)
