"""Throughput and peak memory of one LoRA / DoRA (+MacDrop) training step: mwjax vs HF transformers + PEFT,
same shape, same run.

    python -m benchmarks.train_step                                  # small Llama shape, float32 (CPU)
    python -m benchmarks.train_step --shape=llama3_8b --dtype=bfloat16 --batch=8 --seq=1024 --remat=full   # GPU

Both sides get a randomly initialised Llama of the chosen shape, LoRA (or DoRA) rank 16 / alpha 16 on every
linear layer except lm_head, one micro-batch of `batch x seq` tokens per optimizer step, AdamW, activation
checkpointing when --remat is set (HF: gradient_checkpointing_enable). Each measurement runs in its own process
(so that one side's memory pool never holds the other's) and reports its median step time and peak memory: on
GPU the device's peak (jax `memory_stats()`, torch `max_memory_allocated()`), on CPU the process's peak RSS.
Prints tokens/s, the ratios mwjax / HF+PEFT (higher is better) and MacDrop's overhead (mwjax with vs without
the mask).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from mwjax.families.hf_config import read_hf_config

SHAPES = {  # HF LlamaConfig fields
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, rope_theta=10000.0),
}


def timed(step, warmup: int, repeats: int) -> float:
    """Median seconds per call of `step()` (which must block until its work is done)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def mwjax_step_time(hf_config: dict, args, macdrop_on: bool, dora: bool) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mwjax import macdrop, models, peft
    from mwjax.core import sharding
    from mwjax.finetune import train
    from mwjax.research.massive import MassiveWeights

    config = read_hf_config(hf_config | {"model_type": "llama", "max_position_embeddings": args.seq})
    model = models.build(config, dtype=jnp.dtype(args.dtype), seed=0)
    model = peft.add_adapters(model, peft.LoraConfig(rank=16, alpha=16.0, dora=dora))
    tc = train.TrainConfig(micro_batch_size=args.batch, grad_accum=1, remat=args.remat, max_steps=1000,
                           warmup_ratio=0.0)
    md = None
    if macdrop_on:
        mw = MassiveWeights(layer=1, indices=(0, 1, 2, 3, 4), values=(1.0,) * 5, median=0.0, token_id=1)
        md = macdrop.MacDrop.from_massive_weights(mw, 5, config.hidden_size, config.intermediate_size,
                                                  macdrop.curriculum("step", 0.8, total_steps=1000))
    trainer = train.Trainer(model, tc, steps=1000, mesh=sharding.make_mesh(), macdrop=md)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size, (1, args.batch, args.seq)).astype(np.int32)
    ones = np.ones_like(tokens)
    batch = trainer.place_batch({"tokens": tokens, "labels": tokens, "segment_ids": ones,
                                 "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape)}, 1)
    box = {"state": trainer.initial_state}

    def step():
        box["state"], metrics = trainer.step_fn(box["state"], trainer.frozen, batch)
        jax.block_until_ready(metrics["loss"])

    return timed(step, args.warmup, args.repeats)


def hf_step_time(hf_config: dict, args, dora: bool) -> float:
    import peft as peft_lib
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = transformers.LlamaConfig(**hf_config, max_position_embeddings=args.seq)
    with torch.device(device):  # built where it runs, in its dtype: no float32 8B copy on the host first
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(
        r=16, lora_alpha=16, use_dora=dora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    for p in model.parameters():  # fp32 adapters over a bf16 base, as mwjax trains them
        if p.requires_grad:
            p.data = p.data.float()
    if args.remat:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999))
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return timed(step, args.warmup, args.repeats)


def peak_bytes(side: str) -> int:
    """The peak memory of this process's accelerator (GPU), else the process's peak RSS."""
    if side == "mwjax":
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"])
    else:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> None:
    """One measurement (--child=side:adapter:macdrop), printed as the last line of JSON."""
    side, adapter, macdrop_on = args.child.split(":")
    dora = adapter == "dora"
    if side == "mwjax":
        seconds = mwjax_step_time(SHAPES[args.shape], args, macdrop_on == "macdrop", dora)
    else:
        seconds = hf_step_time(SHAPES[args.shape], args, dora)
    print(json.dumps({"seconds": seconds, "peak": peak_bytes(side)}))


def measure(args, side: str, adapter: str, macdrop_on: bool) -> dict:
    flags = [f"--{k}={v}" for k, v in vars(args).items() if v is not None and k not in ("child", "skip_hf", "adapters")]
    cmd = [sys.executable, "-m", "benchmarks.train_step", *flags,
           f"--child={side}:{adapter}:{'macdrop' if macdrop_on else 'plain'}"]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # peak = what the step needs, not a pool
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", choices=["full", "dots", "nothing", "offload"], default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapters", default="lora,dora", help="comma-separated: lora, dora")
    parser.add_argument("--skip_hf", action="store_true", help="time mwjax only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    tokens = args.batch * args.seq
    print(f"shape {args.shape}, {args.dtype}, batch {args.batch} x {args.seq}, remat {args.remat}; "
          f"median of {args.repeats} steps, each measurement in its own process", flush=True)
    print(f"{'':22} {'ms/step':>9} {'tokens/s':>9} {'peak GiB':>9}")

    def row(label, r, extra=""):
        print(f"{label:22} {r['seconds'] * 1e3:9.1f} {tokens / r['seconds']:9.0f} {r['peak'] / 2**30:9.2f}  {extra}",
              flush=True)

    for adapter in args.adapters.split(","):
        name = {"lora": "LoRA", "dora": "DoRA"}[adapter]
        plain = measure(args, "mwjax", adapter, False)
        row(f"mwjax {name}", plain)
        masked = measure(args, "mwjax", adapter, True)
        overhead = 100 * (masked["seconds"] / plain["seconds"] - 1)
        row(f"mwjax {name}+MacDrop", masked, f"(MacDrop overhead {overhead:+.1f}%)")
        if not args.skip_hf:
            hf = measure(args, "hf", adapter, False)
            row(f"HF+PEFT {name}", hf, f"(mwjax / HF+PEFT: {hf['seconds'] / plain['seconds']:.2f}x tokens/s, "
                                     f"{plain['peak'] / hf['peak']:.2f}x peak memory)")


if __name__ == "__main__":
    main()
