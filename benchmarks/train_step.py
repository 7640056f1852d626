"""Throughput of one LoRA (+MacDrop) training step: mwjax vs HF transformers + PEFT, same shape, same run.

    python benchmarks/train_step.py                                  # small Llama shape, float32 (CPU)
    python benchmarks/train_step.py --shape=llama3_8b --dtype=bfloat16 --batch=8 --seq=1024 --remat=full   # GPU

Both sides get a randomly initialised Llama of the chosen shape, LoRA rank 16 / alpha 16 on every linear layer
except lm_head, one micro-batch of `batch x seq` tokens per optimizer step, AdamW, activation checkpointing
when --remat is set (HF: gradient_checkpointing_enable). Prints tokens/s of each, the ratio
mwjax / HF (higher is better) and MacDrop's overhead (mwjax step time with vs without the mask).
"""

from __future__ import annotations

import argparse
import time

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


def mwjax_step_time(hf_config: dict, args, macdrop_on: bool) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mwjax import macdrop, models, peft, sharding, train
    from mwjax.config import ModelConfig
    from mwjax.massive import MassiveWeights

    config = ModelConfig.from_hf_config(hf_config | {"model_type": "llama", "max_position_embeddings": args.seq})
    model = models.build(config, dtype=jnp.dtype(args.dtype), seed=0)
    model = peft.add_adapters(model, peft.LoraConfig(rank=16, alpha=16.0))
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


def hf_step_time(hf_config: dict, args) -> float:
    import peft as peft_lib
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    config = transformers.LlamaConfig(**hf_config, max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(
        r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--remat", choices=["full", "dots", "nothing"], default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip_hf", action="store_true", help="time mwjax only")
    args = parser.parse_args()

    import jax

    hf_config = SHAPES[args.shape]
    tokens = args.batch * args.seq
    plain = mwjax_step_time(hf_config, args, macdrop_on=False)
    with_mask = mwjax_step_time(hf_config, args, macdrop_on=True)
    print(f"shape {args.shape}, {args.dtype}, batch {args.batch} x {args.seq}, remat {args.remat}, "
          f"jax on {jax.devices()[0].platform}")
    print(f"mwjax LoRA          {plain * 1e3:9.1f} ms/step  {tokens / plain:10.0f} tokens/s")
    print(f"mwjax LoRA+MacDrop  {with_mask * 1e3:9.1f} ms/step  {tokens / with_mask:10.0f} tokens/s  "
          f"(MacDrop overhead {100 * (with_mask / plain - 1):+.1f}%)")
    if not args.skip_hf:
        hf = hf_step_time(hf_config, args)
        print(f"HF+PEFT LoRA        {hf * 1e3:9.1f} ms/step  {tokens / hf:10.0f} tokens/s")
        print(f"ratio mwjax / HF+PEFT tokens/s: {hf / plain:.2f}")


if __name__ == "__main__":
    main()
