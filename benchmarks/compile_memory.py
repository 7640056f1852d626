"""Memory of the compiled LoRA training step at Llama 3 scale, measured without weights.

    python -m benchmarks.compile_memory                     # 8B shape, 4 and 8 layers, remat none / full
    python -m benchmarks.compile_memory --layers 32 --remat full
    python -m benchmarks.compile_memory --shape llama3_70b --layers 8 80 --remat full --devices 64 --mesh 8x8
    python -m benchmarks.compile_memory --layout unrolled           # the layers as a Python loop, for comparison

The trainer's step (`mwjax.finetune.train.Trainer.step_fn`: forward, loss, backward, AdamW) is lowered and compiled on
`jax.ShapeDtypeStruct` inputs (an `nnx.eval_shape` model: no weight is allocated) for a Llama of the chosen
shape, bfloat16 base, float32 LoRA rank 16 on every linear layer but lm_head, one micro-batch of
batch x seq tokens, the decoder layers stacked and scanned (`TrainConfig.scan_layers`) or unrolled. With
`--devices N --mesh FxT` the step is sharded over N simulated CPU devices (fsdp F x tensor T) and the memory
is per device. Each (layers, remat) row is compiled with the vocabulary loss whole (`loss_chunk=None`:
[b, t, V] float32 logits) and in chunks (`--loss_chunk` positions), so the saving shows in one run. Prints
XLA's temp and argument memory (`compiled.memory_analysis()`) and the compile time, on whatever backend jax
runs (CPU by default; the numbers are the compiler's plan for that backend). No FLOP count: XLA's
`cost_analysis()` counts a loop body once, so it would show one chunk of the chunked loss.
"""

from __future__ import annotations

import argparse
import os
import time

from mwjax.families.hf_config import read_hf_config

SHAPES = {  # HF LlamaConfig fields
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "llama3_70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, rope_theta=500000.0),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0),
}
GIB = 2**30


def compile_step(hf_config: dict, args, layers: int, remat: str | None, loss_chunk: int | None,
                 scan: bool) -> dict:
    """Compile one training step abstractly; its memory (bytes) and compile seconds."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mwjax import models, peft
    from mwjax.core import sharding
    from mwjax.finetune import train

    dtype = jnp.dtype(args.dtype)
    config = read_hf_config(hf_config | {"model_type": "llama", "num_hidden_layers": layers,
                                                     "max_position_embeddings": args.seq})
    model = nnx.eval_shape(lambda: peft.add_adapters(models.build(config, dtype=dtype),
                                                     peft.LoraConfig(rank=16, alpha=16.0)))
    tc = train.TrainConfig(micro_batch_size=args.batch, grad_accum=1, remat=remat, loss_chunk=loss_chunk,
                           max_steps=1000, scan_layers=scan)
    fsdp, tensor = args.mesh
    trainer = train.Trainer(model, tc, steps=1000, mesh=sharding.make_mesh(fsdp=fsdp, tensor=tensor))
    shape = (1, args.batch, args.seq)  # [grad_accum, batch, seq]
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(trainer.mesh, 3, axis=1))
             for k in train.BATCH_KEYS}
    start = time.perf_counter()
    compiled = trainer.step_fn.lower(trainer.initial_state, trainer.frozen, batch).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {"temp": memory.temp_size_in_bytes, "argument": memory.argument_size_in_bytes, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3_8b")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8], help="decoder layers (default 4 8)")
    parser.add_argument("--remat", nargs="+", choices=["none", "full", "dots", "nothing", "offload"],
                        default=["none", "full"])
    parser.add_argument("--loss_chunk", type=int, default=256, help="positions per chunk of the chunked loss")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--layout", nargs="+", choices=["scan", "unrolled"], default=["scan"])
    parser.add_argument("--devices", type=int, default=1, help="simulated CPU devices (XLA_FLAGS)")
    parser.add_argument("--mesh", default=None, help="FSDPxTENSOR over the devices (default: all fsdp)")
    args = parser.parse_args()
    args.mesh = tuple(map(int, args.mesh.split("x"))) if args.mesh else (args.devices, 1)
    if args.mesh[0] * args.mesh[1] != args.devices:
        parser.error(f"--mesh {args.mesh[0]}x{args.mesh[1]} does not cover --devices {args.devices}")
    if args.devices > 1:  # before jax starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    print(f"shape {args.shape}, {args.dtype}, LoRA r16 on every linear layer, batch {args.batch} x {args.seq}, "
          f"jax {jax.__version__} on {len(jax.devices())} {jax.devices()[0].platform} device(s), mesh fsdp "
          f"{args.mesh[0]} x tensor {args.mesh[1]}; GiB per device from compiled.memory_analysis()")
    print(f"{'layout':>8} {'layers':>6} {'remat':>7} {'loss':>10} {'temp GiB':>9} {'args GiB':>9} {'sum GiB':>8} "
          f"{'compile s':>9}")
    for layout in args.layout:
        for layers in args.layers:
            for remat in args.remat:
                temps = []
                for chunk in (None, args.loss_chunk):
                    r = compile_step(SHAPES[args.shape], args, layers, None if remat == "none" else remat, chunk,
                                     scan=layout == "scan")
                    temps.append(r["temp"])
                    loss = "whole" if chunk is None else f"chunk {chunk}"
                    print(f"{layout:>8} {layers:>6} {remat:>7} {loss:>10} {r['temp'] / GIB:9.2f} "
                          f"{r['argument'] / GIB:9.2f} {(r['temp'] + r['argument']) / GIB:8.2f} {r['seconds']:9.1f}",
                          flush=True)
                print(f"{'':>8} {'':>6} {'':>7} {'saving':>10} {(temps[0] - temps[1]) / GIB:9.2f}", flush=True)


if __name__ == "__main__":
    main()
