"""lm-eval requests/s with the mwjax backend vs lm-eval's own HF backend: same model, tasks, machine, run.

    python -m benchmarks.lm_eval_throughput                          # embedded SmolLM2, CPU-sized task set
    python -m benchmarks.lm_eval_throughput --docs=200 --batch_size=32 --lengths=short

The five task formats (ARC-Easy / Challenge, BoolQ, PIQA, WinoGrande) are filled with generated documents and
run through `lm_eval.simple_evaluate` from local files, the two backends alternating pass by pass: the first
pass includes mwjax's XLA compilation, the median of the `--repeats` later ones is the steady state. Prints
requests/s of each and the ratios mwjax / HF (higher is better), and checks that both backends agree on
every accuracy.

`--lengths` sets the documents' shape (the real datasets cannot be downloaded here):
- "task" (default): items of about the real tasks' size, in random common words: an ARC question of 20 to 30
  words with four answers of 1 to 6 words, a BoolQ passage of 90 to 130 words with its question, a PIQA goal
  of 10 words with two solutions of 20 to 32 words, a WinoGrande sentence of 19 to 25 words with two options
  of 2 and 5 words.
- "short": the earlier set: ~10-word items whose ARC answers are one colour word, a single token, which
  lm-eval's HF backend already scores once per question (its one-token continuation cache), as BoolQ's
  yes / no.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
THINGS = ["apple", "car", "house", "river", "book", "cloud", "stone", "bird", "chair", "lamp"]
WORDS = ("the a of and to in is was that for it with as on by at from this which or be are an not but have had "
         "were their one all there can more when some what about into than them only other time would these two "
         "may first then its over such like our most made after also did many before must through back years "
         "where much your way well down should because each just those people how too little state good very "
         "make world still own see men work long get here between both life being under never day same another "
         "know while last might great old year off come since against go came right used take three water heat "
         "light energy plant animal soil rock weather season moon earth sun gravity magnet metal liquid gas "
         "solid cell seed forest ocean mountain desert storm river valley glacier insect").split()


def documents(n: int, lengths: str = "task", seed: int = 0) -> dict[str, list[dict]]:
    """n generated documents for each of the five tasks, in the shape `lengths` names (module docstring)."""
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
    long = lengths == "task"
    docs = {t: [] for t in ("arc_easy", "arc_challenge", "boolq", "piqa", "winogrande")}
    for i in range(n):
        thing, color = rng.choice(THINGS), rng.choice(COLORS)
        if long:
            question = f"{words(rng.randint(12, 24)).capitalize()}: what happens to the {thing} painted {color}?"
            choices = [words(rng.randint(1, 6)) for _ in range(4)]
        else:
            question = f"The {thing} in the picture is painted {color}. What colour is the {thing}?"
            choices = rng.sample(COLORS, 4)
        answer = "ABCD"[choices.index(color)] if color in choices else "ABCD"[i % 4]
        docs["arc_easy"].append({"id": str(i), "question": question,
                                 "choices": {"text": choices, "label": list("ABCD")}, "answerKey": answer})
        docs["arc_challenge"].append(dict(docs["arc_easy"][-1], id=f"c{i}"))
        passage = f"Everyone agreed that the {thing} was {rng.choice(COLORS)} and quite old."
        docs["boolq"].append({"question": f"is the {thing} {color}", "idx": i, "label": rng.randint(0, 1),
                              "passage": f"{words(rng.randint(80, 120)).capitalize()}. {passage}" if long else passage})
        sol1, sol2 = "wipe it with a damp cloth.", f"paint it {color}."
        if long:
            sol1, sol2 = f"{words(rng.randint(14, 26))}, then {sol1}", f"{words(rng.randint(14, 26))}, then {sol2}"
        docs["piqa"].append({"goal": f"To clean a dusty {thing}{', ' + words(5) if long else ''},", "sol1": sol1,
                             "sol2": sol2, "label": 0})
        other = rng.choice(THINGS)
        options = ((f"the {thing}", f"the old {other} by the door") if long else (f"the {thing}", "the other one"))
        sentence = (f"The {thing} was heavier than the {other} because _ was made of stone"
                    + (f", {words(rng.randint(6, 12))}." if long else "."))
        docs["winogrande"].append({"sentence": sentence, "option1": options[0], "option2": options[1],
                                   "answer": "1"})
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=40, help="documents per task")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="steady-state passes per backend")
    parser.add_argument("--lengths", choices=("task", "short"), default="task",
                        help="the documents' shape: about the real tasks' lengths, or the earlier short set")
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
        for task, docs in documents(args.docs, args.lengths).items():
            (data / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        tasks = zeroshot_tasks.write_local_tasks(data, include)
        manager = TaskManager(include_path=str(include))
        backends = {"mwjax": MwjaxLM(model, tokenizer, batch_size=args.batch_size, add_bos_token=True),
                    "hf": HFLM(pretrained=hf, tokenizer=tokenizer, batch_size=args.batch_size, add_bos_token=True)}
        timings, results = {name: [] for name in backends}, {}
        for _ in range(1 + args.repeats):  # the backends alternate, so a busy machine slows both alike
            for name, lm in backends.items():
                start = time.perf_counter()
                results[name] = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                                        log_samples=True)
                timings[name].append(time.perf_counter() - start)
    requests = sum(len(s["resps"]) for samples in results["hf"]["samples"].values() for s in samples)
    for task in tasks:
        assert results["mwjax"]["results"][task]["acc,none"] == results["hf"]["results"][task]["acc,none"], task
    print(f"{requests} loglikelihood requests ({args.docs} docs x 5 tasks, lengths={args.lengths}), batch "
          f"{args.batch_size}, same accuracies on every task:")
    for label, pick in (("first pass (with compilation)", lambda t: t[0]),
                        (f"steady state (median of {args.repeats})", lambda t: statistics.median(t[1:]))):
        rate = {name: requests / pick(timings[name]) for name in backends}
        print(f"  {label}: mwjax {rate['mwjax']:.1f} req/s, HF {rate['hf']:.1f} req/s, "
              f"ratio mwjax/HF = {rate['mwjax'] / rate['hf']:.2f}")

if __name__ == "__main__":
    main()
