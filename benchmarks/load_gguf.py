"""Time loading a GGUF checkpoint (model + tokenizer): mwjax vs transformers, same file, same run.

    python benchmarks/load_gguf.py                       # the embedded SmolLM2-135M-Instruct Q4_1
    python benchmarks/load_gguf.py --model=path/to/model.gguf --repeats=3

Prints each side's best time and the ratio mwjax / transformers (lower is better; <= 1 is the goal).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if hasattr(result[0], "config"):
            import jax

            jax.block_until_ready(jax.tree.leaves(result[0]))
        times.append(time.perf_counter() - start)
        del result
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a .gguf file (default: embedded SmolLM2)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    import transformers

    from mwjax import converters
    from mwjax.converters import embedded

    path = Path(args.model) if args.model else embedded.path("smollm2")
    path.read_bytes()  # warm the page cache for both sides

    def with_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return model, tokenizer

    def with_mwjax():
        return converters.load(path)

    with_mwjax(), with_transformers()  # first-use costs (imports, JAX backend start) for both
    ours = best_of(with_mwjax, args.repeats)
    theirs = best_of(with_transformers, args.repeats)
    print(f"{path.name}: mwjax {ours:.2f} s, transformers {theirs:.2f} s, ratio mwjax/transformers = "
          f"{ours / theirs:.2f} (best of {args.repeats}, model + tokenizer, float32)")


if __name__ == "__main__":
    main()
