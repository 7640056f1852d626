"""Perplexity throughput: `mwjax.eval.perplexity` vs transformers running the same protocol, same model, same run.

    python -m benchmarks.perplexity                                 # embedded SmolLM2, float32, 8 chunks of 512
    python -m benchmarks.perplexity --chunks=16 --seqlen=1024 --batch_size=4 --repeats=3

The protocol is the massive-activations code's (House of Cards Table 1; `mwjax.eval.perplexity`): the token
stream cut into non-overlapping chunks of `seqlen`, each chunk's mean next-token NLL, PPL = exp(mean over
chunks). transformers runs it as that code does: the model's forward in batches of chunks under
`torch.inference_mode`, the log-softmax NLL of every position but the last. mwjax runs `perplexity()`
(jitted, one program for every batch). The two alternate pass by pass; the first mwjax pass includes its XLA
compilation, the median of the later ones is the steady state. Prints tokens/s of each, the ratios
mwjax / transformers (higher is better) and both perplexities.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def hf_perplexity(hf, chunks, batch_size: int) -> float:
    """The massive-activations code's perplexity loop with transformers: exp(mean over chunks of the mean NLL)."""
    import torch

    nlls = []
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            batch = torch.from_numpy(chunks[start:start + batch_size]).long()
            logits = hf(batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            nlls += nll.mean(-1).tolist()
    return float(torch.tensor(nlls, dtype=torch.float64).mean().exp())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="steady-state passes per side")
    args = parser.parse_args()

    import torch
    import transformers

    import mwjax
    from mwjax import converters
    from mwjax.converters import embedded
    from mwjax.eval.likelihood import chunk_tokens, perplexity

    path = Path(args.model) if args.model else embedded.path("smollm2")
    model, tokenizer = converters.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    # the text: mwjax's own sources (no corpus can be downloaded here), as many chunks as they make
    sources = sorted(Path(mwjax.__file__).parent.rglob("*.py"))
    stream = tokenizer.encode("\n".join(p.read_text() for p in sources), add_special_tokens=False)
    if len(stream) < args.chunks * args.seqlen:
        parser.error(f"the sources make {len(stream)} tokens, fewer than --chunks x --seqlen")
    stream = stream[:args.chunks * args.seqlen]
    chunks = chunk_tokens(stream, args.seqlen)
    sides = {"mwjax": lambda: perplexity(model, stream, args.seqlen, batch_size=args.batch_size,
                                         progress=False).perplexity,
             "transformers": lambda: hf_perplexity(hf, chunks, args.batch_size)}
    times, ppl = {name: [] for name in sides}, {}
    for _ in range(1 + args.repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            ppl[name] = run()
            times[name].append(time.perf_counter() - start)
    tokens = args.chunks * args.seqlen
    gap = abs(ppl["mwjax"] / ppl["transformers"] - 1)
    print(f"{path.name}: float32, mwjax's sources as text, {args.chunks} chunks x {args.seqlen} tokens, batch "
          f"{args.batch_size}, torch threads {torch.get_num_threads()}; perplexity mwjax {ppl['mwjax']:.4f}, "
          f"transformers {ppl['transformers']:.4f} (relative difference {gap:.1e})")
    for label, pick in (("first pass (with compilation)", lambda t: t[0]),
                        (f"steady state (median of {args.repeats})", lambda t: statistics.median(t[1:]))):
        rate = {name: tokens / pick(t) for name, t in times.items()}
        print(f"  {label}: mwjax {rate['mwjax']:.0f} tokens/s, transformers {rate['transformers']:.0f} tokens/s, "
              f"ratio mwjax/transformers = {rate['mwjax'] / rate['transformers']:.2f}")


if __name__ == "__main__":
    main()
