"""Compile time and memory of probing a Llama (`probes.capture`), its decoder layers stacked and scanned or
unrolled, measured without weights.

    python -m benchmarks.probe_compile                                  # small shape, 4 and 32 layers, both layouts
    python -m benchmarks.probe_compile --shape llama3_8b --layers 32 --seq 2048 --probe_layers 1 --full

`probes.capture` (forward, probes, an activation edit on layer 1's hidden state) is lowered and compiled on
`jax.ShapeDtypeStruct` inputs (an `nnx.eval_shape` model: no weight is allocated). Probes: "hidden",
"attn_probs" (which needs the eager attention) and "intermediate", at `--probe_layers` (default: all), as
top-4 / median statistics or, with `--full`, whole tensors. Prints XLA's temp and output memory
(`compiled.memory_analysis()`) and the lower and compile seconds, on whatever backend jax runs (CPU by default).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.compile_memory import GIB, SHAPES
from mwjax.families.hf_config import read_hf_config


def compile_probes(hf_config: dict, args, layers: int, stacked: bool) -> dict:
    """Compile one probed forward abstractly; its memory (bytes) and seconds."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mwjax import models, probes
    from mwjax.instrument.interventions import ActivationEdit
    from mwjax.nn.stack import stack_layers

    config = read_hf_config(hf_config | {"model_type": "llama", "num_hidden_layers": layers,
                                                     "max_position_embeddings": args.seq})
    build = lambda: models.build(config, dtype=jnp.dtype(args.dtype))
    model = nnx.eval_shape(lambda: stack_layers(build()) if stacked else build())
    probe = probes.ProbeConfig(points=("hidden", "attn_probs", "intermediate"), layers=args.probe_layers,
                               full=args.full, top_k=0 if args.full else 4, median=not args.full)
    edits = {("hidden", 1): ActivationEdit(dims=jnp.asarray([0, 1]), values=jnp.zeros(2))}
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    lowered = probes._capture.on_state.lower(graphdef, state, probe, tokens, {"edits": edits})  # what capture runs
    lowered_at = time.perf_counter()
    memory = lowered.compile().memory_analysis()
    return {"temp": memory.temp_size_in_bytes, "output": memory.output_size_in_bytes,
            "lower": lowered_at - start, "compile": time.perf_counter() - lowered_at}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32], help="decoder layers (default 4 32)")
    parser.add_argument("--layout", nargs="+", choices=["scan", "unrolled"], default=["scan", "unrolled"])
    parser.add_argument("--probe_layers", type=int, nargs="*", default=None, help="probed layers (default: all)")
    parser.add_argument("--full", action="store_true", help="whole tensors instead of top-4 / median")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()

    import jax

    what = "whole tensors" if args.full else "top-4 / median"
    print(f"shape {args.shape}, {args.dtype}, batch {args.batch} x {args.seq}, probes hidden / attn_probs / "
          f"intermediate ({what}) at layers {args.probe_layers or 'all'}, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; GiB from compiled.memory_analysis()")
    compile_probes(SHAPES[args.shape], args, 2, stacked=True)  # warm-up: jax's own first-use costs
    print(f"{'layout':>8} {'layers':>6} {'temp GiB':>9} {'output GiB':>10} {'lower s':>8} {'compile s':>9}")
    for layout in args.layout:
        for layers in args.layers:
            r = compile_probes(SHAPES[args.shape], args, layers, stacked=layout == "scan")
            print(f"{layout:>8} {layers:>6} {r['temp'] / GIB:9.3f} {r['output'] / GIB:10.3f} {r['lower']:8.2f} "
                  f"{r['compile']:9.2f}", flush=True)


if __name__ == "__main__":
    main()
