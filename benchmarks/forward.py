"""Time one forward pass (tokens -> logits): jitted mwjax vs transformers eager, same GGUF, same tokens, same run.

    python -m benchmarks.forward                                    # embedded SmolLM2, float32, a few shapes
    python -m benchmarks.forward --shapes=1x512,16x32 --attention=xla --repeats=7

mwjax runs `mwjax.families.forward` (compiled once per shape, before the timing); transformers runs the model
as loaded (`attn_implementation` sdpa by default), under `torch.inference_mode`. The two alternate call by
call, so a busy machine slows both alike; each side's median is reported, with the ratio mwjax /
transformers (lower is better; the goal is <= 0.8) and the largest |logit difference| as a check.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def alternate(model, hf, tokens, repeats: int) -> tuple[list[float], list[float], float]:
    """Seconds per call of each side, the two alternating, after a first call of each (mwjax compiles the
    shape); and the largest |logit difference| between them."""
    import jax
    import numpy as np
    import torch

    from mwjax import models

    torch_tokens = torch.from_numpy(tokens).long()
    sides = (lambda: np.asarray(jax.block_until_ready(models.forward(model, tokens))),
             lambda: hf(torch_tokens).logits)
    times = ([], [])
    with torch.inference_mode():
        diff = float(np.abs(sides[0]() - sides[1]().numpy()).max())
        for _ in range(repeats):
            for side, record in zip(sides, times, strict=True):
                start = time.perf_counter()
                side()
                record.append(time.perf_counter() - start)
    return *times, diff


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--shapes", default="1x128,1x512,8x128,16x32", help="batch x sequence, comma-separated")
    parser.add_argument("--attention", default="auto", help="mwjax attention path: auto, eager or xla")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers

    from mwjax import converters
    from mwjax.converters import embedded

    path = Path(args.model) if args.model else embedded.path("smollm2")
    model, _ = converters.load(path, tokenizer=False)
    model.set_attributes(attention=args.attention)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    print(f"{path.name}: float32, mwjax attention={args.attention}, transformers "
          f"attn_implementation={hf.config._attn_implementation}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| batch x seq | mwjax ms | transformers ms | ratio | max abs logit diff |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, seq = (int(n) for n in shape.split("x"))
        tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
        ours, theirs, diff = alternate(model, hf, tokens, args.repeats)
        ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
        print(f"| {batch} x {seq} | {1e3 * ours_s:.1f} | {1e3 * theirs_s:.1f} | {ours_s / theirs_s:.2f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
