"""lm-eval requests/s with the mwjax backend vs lm-eval's own HF backend: same model, tasks, machine, run.

    python benchmarks/lm_eval_throughput.py                          # embedded SmolLM2, CPU-sized task set
    python benchmarks/lm_eval_throughput.py --docs=200 --batch_size=32

The five task formats (ARC, BoolQ, PIQA, WinoGrande) are filled with generated documents and run
through `lm_eval.simple_evaluate` from local files, twice per backend: the first pass includes
mwjax's XLA compilation (a handful of programs, one per length bucket), the second is the steady
state. Prints requests/s of each and the ratios mwjax / HF (higher is better), and checks that
both backends agree on every accuracy.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "car", "house", "river", "book", "cloud", "stone", "bird", "chair", "lamp"]


def documents(n: int, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    docs = {t: [] for t in ("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande")}
    for i in range(n):
        thing, color = rng.choice(THINGS), rng.choice(COLORS)
        choices = rng.sample(COLORS, 4)
        docs["arc_easy"].append({"id": str(i), "question": f"The {thing} in the picture is painted {color}. "
                                 f"What colour is the {thing}?", "choices": {"text": choices, "label": list("ABCD")},
                                 "answerKey": "ABCD"[choices.index(color)] if color in choices else "A"})
        docs["arc_challenge"].append(dict(docs["arc_easy"][-1], id=f"c{i}"))
        docs["boolq"].append({"question": f"is the {thing} {color}", "passage": f"Everyone agreed that the {thing} "
                              f"was {rng.choice(COLORS)} and quite old.", "idx": i, "label": rng.randint(0, 1)})
        docs["piqa"].append({"goal": f"To clean a dusty {thing},", "sol1": "wipe it with a damp cloth.",
                             "sol2": f"paint it {color}.", "label": 0})
        docs["winogrande"].append({"sentence": f"The {thing} was heavier than the {rng.choice(THINGS)} because _ "
                                   "was made of stone.", "option1": f"the {thing}", "option2": "the other one",
                                   "answer": "1"})
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=40, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mwjax import converters
    from mwjax.converters import embedded
    from mwjax.eval import zeroshot_tasks
    from mwjax.eval.lm_eval import MwjaxLM

    path = embedded.path("smollm2")
    model, tokenizer = converters.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data, include = Path(tmp, "data"), Path(tmp, "tasks")
        data.mkdir()
        for task, docs in documents(args.docs).items():
            (data / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        tasks = zeroshot_tasks.write_local_tasks(data, include)
        manager = TaskManager(include_path=str(include))
        backends = {"mwjax": MwjaxLM(model, tokenizer, batch_size=args.batch_size, add_bos_token=True),
                    "hf": HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=args.batch_size, add_bos_token=True)}
        timings, results = {}, {}
        for name, lm in backends.items():
            for run in ("first", "second"):
                start = time.perf_counter()
                results[name] = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                                        log_samples=True)
                timings[(name, run)] = time.perf_counter() - start
    requests = sum(len(s["resps"]) for samples in results["hf"]["samples"].values() for s in samples)
    for task in tasks:
        assert results["mwjax"]["results"][task]["acc,none"] == results["hf"]["results"][task]["acc,none"], task
    print(f"{requests} loglikelihood requests ({args.docs} docs x 5 tasks), batch {args.batch_size}, "
          "same accuracies on every task:")
    for run in ("first", "second"):
        rate = {name: requests / timings[(name, run)] for name in backends}
        print(f"  {run} pass: mwjax {rate['mwjax']:.1f} req/s, HF {rate['hf']:.1f} req/s, "
              f"ratio mwjax/HF = {rate['mwjax'] / rate['hf']:.2f}")


if __name__ == "__main__":
    main()
