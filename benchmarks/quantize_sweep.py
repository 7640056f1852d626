"""The Super Weight's Figure 7 block-size sweep on the embedded SmolLM2: one compiled program for every block size
(`mwjax.research.quantize.sweep`, the block size traced) vs one program per block size (`quantize.apply` with the block
size compiled in, as a loop over sizes would build it).

    python -m benchmarks.quantize_sweep                                   # blocks 64 128 256 512 1024 2048 4096
    python -m benchmarks.quantize_sweep --blocks 64 4096 --seq 128 --curves 2

Each point is the INT4 weight-only quantized model's forward pass (quantization inside it: `quantize.apply`'s
model) on one batch; `--curves 2` adds Figure 7's clipped + super-weights-restored curve (a traced switch: the
one-program sweep runs it in the same program, the per-block one compiles it again). Prints each point's
seconds (the first of each program includes its compilation), the sweep's total, the number of compiled programs
and the ratio; then one steady-state pass of each, the price of the traced block size (segment reductions instead
of a reshape).
"""

from __future__ import annotations

import argparse
import math
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--curves", type=int, choices=[1, 2], default=1, help="1: round-to-nearest; 2: + handled")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mwjax import converters, massive, quantize
    from mwjax.core.compiled import jit_model
    from mwjax.research.quantize import sweep

    @jit_model
    def forward(model, tokens):
        return model(tokens)[:, -1]  # the last position's logits: every layer runs, little to copy out

    model, tokenizer = converters.load(args.model, dtype=jnp.float32)
    sws = massive.find_super_weights(model, tokenizer)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq)),
                         jnp.int32)
    curves = [sweep.ROUND_TO_NEAREST] + ([sweep.HANDLED] if args.curves == 2 else [])
    points = [p for ps in sweep.block_sweep_points(args.blocks, bits=4, curves=curves).values() for p in ps]
    labels = [f"{c}, block {b}" for c in curves for b in args.blocks]
    print(f"{args.model}: INT4 weight-only, {len(args.blocks)} block sizes x {len(curves)} curve(s), forward of "
          f"{args.batch} x {args.seq} tokens, jax {jax.__version__} on {jax.devices()[0].platform}")
    forward(model, tokens).block_until_ready()  # jax's own first-use costs, outside both sweeps

    def timed(m):
        start = time.perf_counter()
        forward(m, tokens).block_until_ready()
        return time.perf_counter() - start

    def per_block():
        for p in points:  # no clipping code where the threshold is infinite, as a separate build would have
            clip = "none" if math.isinf(p.weights.clip_threshold) else p.weights.clip
            spec = dataclasses.replace(p.weights, clip=clip)
            yield quantize.apply(model, spec, super_weights=sws if p.restore else ())

    results = {}
    for name, models in (("one program", sweep.models(model, points, super_weights=sws)),
                         ("one program per block size", per_block())):
        before = forward._cache_size()
        start = time.perf_counter()
        seconds, last = [], None
        for label, m in zip(labels, models, strict=True):
            seconds.append(timed(m))
            last = m
            print(f"  {name}: {label}: {seconds[-1]:.2f} s", flush=True)
        total = time.perf_counter() - start
        results[name] = {"total": total, "programs": forward._cache_size() - before, "steady": timed(last)}
        print(f"{name}: {total:.1f} s for {len(points)} points, {results[name]['programs']} compiled program(s), "
              f"then {results[name]['steady']:.2f} s a pass", flush=True)
    one, many = results["one program"], results["one program per block size"]
    print("\n| sweep | compiled programs | total s | steady s / pass |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['programs']} | {r['total']:.1f} | {r['steady']:.2f} |")
    print(f"\nratio (one program per block size / one program): {many['total'] / one['total']:.2f}x")


if __name__ == "__main__":
    main()
