"""LongBench's 16 English datasets through lm-eval's `longbench_*` tasks (House of Cards Table 9).

The paper ran LongBench (Bai et al., 2024) with the model's max length set to 7,500 tokens. This module
keeps LongBench's own protocol (THUDM/LongBench pred.py / eval.py) where lm-eval's tasks leave it open:
  - a prompt over `max_length` tokens loses its middle, not its left end (`mwjax.eval.lm_eval.middle_truncate`,
    the backend's truncation="middle"), before any chat template wraps it;
  - the tokenizer's chat template wraps the prompt of every dataset but the few-shot and code ones
    (NO_CHAT_TEMPLATE), where LongBench found chat models better off without it; a tokenizer without a
    template (the paper's base models) runs every dataset on the plain prompt, as LongBench's pred.py does
    for a model it has no template for;
  - bos as the tokenizer's default (pred.py tokenizes with it).
lm-eval's task configs give the prompts, the generation lengths (LongBench's dataset2maxlen), greedy
decoding and the metrics (qa_f1, rouge-L, classification, count, retrieval, code similarity: lm-eval's
copy of LongBench's metrics.py, which needs `pip install jieba fuzzywuzzy rouge`). One difference stays:
on trec, triviaqa and samsum lm-eval stops generating at the first newline, where LongBench's eval.py drops
leading newlines before it takes the first line.

Data: lm-eval reads the hub copy HUB; `export_task_data(dir)` (where the hub is reachable) writes each
dataset's test split as <dataset>.jsonl, and `Evaluator(data_dir=dir)` runs from such files anywhere.
LongBench's own release files (data.zip: `input` for the question) work as they are.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mwjax.eval.zeroshot_tasks import lm_eval_tasks_dir

# House of Cards Table 9's columns, in its order: (dataset, the paper's column title)
TITLES = {"narrativeqa": "NtvQA", "qasper": "Qasper", "multifieldqa_en": "MF-en", "hotpotqa": "HotpotQA",
          "2wikimqa": "2WikiMQA", "musique": "Musique", "gov_report": "GovReport", "qmsum": "QMSum",
          "multi_news": "MultiNews", "trec": "TREC", "triviaqa": "TriviaQA", "samsum": "SAMSum",
          "passage_count": "PCount", "passage_retrieval_en": "PRe", "lcc": "LCC", "repobench-p": "RB-P"}
DATASETS = tuple(TITLES)
CATEGORIES = {"Single-document QA": DATASETS[0:3], "Multi-document QA": DATASETS[3:6],
              "Summarization": DATASETS[6:9], "Few-shot learning": DATASETS[9:12], "Synthetic": DATASETS[12:14],
              "Code": DATASETS[14:16]}
NO_CHAT_TEMPLATE = ("trec", "triviaqa", "samsum", "lcc", "repobench-p")  # pred.py (and lsht, not English)
MAX_LENGTH = 7500  # House of Cards Appendix H: "We set the max length of models to 7,500"
LONGEST_GENERATION = 512  # the summarization datasets' max_gen_toks (LongBench's dataset2maxlen, lm-eval's configs)
HUB = "Xnhyacinth/LongBench"  # the dataset_path of lm-eval's longbench tasks (THUDM/LongBench as parquet)
LOCAL_SUFFIX = "_local"


def task_name(dataset: str) -> str:
    """lm-eval's task name for a LongBench dataset.

    Args:
      dataset: one of DATASETS.

    Returns:
      "longbench_<dataset>".
    """
    return f"longbench_{dataset}"


def export_task_data(out_dir: str | os.PathLike, names=DATASETS) -> dict[str, Path]:
    """Download each dataset's test split from the hub (HUB) into `out_dir/<dataset>.jsonl`.

    Args:
      out_dir: the directory written (created when missing).
      names: the datasets to export.

    Returns:
      {dataset: the file written}.
    """
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        written[name] = out / f"{name}.jsonl"
        datasets.load_dataset(HUB, name, split="test").to_json(str(written[name]), lines=True, force_ascii=False)
    return written


def check_datasets(names, data_dir: str | os.PathLike | None = None) -> None:
    """Raise unless every name is one of the 16 English datasets and, with `data_dir`, its file is there.

    Args:
      names: the dataset names to check.
      data_dir: a directory that must hold `<dataset>.jsonl` for each; None to skip that check.

    Raises:
      ValueError: for an unknown dataset.
      FileNotFoundError: for a dataset file missing from `data_dir`.
    """
    for name in names:
        if name not in TITLES:
            raise ValueError(f"unknown LongBench dataset {name!r}: write some of {', '.join(DATASETS)}")
        if data_dir is not None and not (Path(data_dir) / f"{name}.jsonl").is_file():
            raise FileNotFoundError(f"{Path(data_dir) / f'{name}.jsonl'} is missing: export it where the hub is "
                                    "reachable with experiments.longbench --export_data=DIR (or mwjax.eval.longbench."
                                    "export_task_data), or unpack LongBench's data.zip there")


def _task_record(record: dict, where: str) -> dict:
    """A LongBench record as lm-eval's tasks read it: the question under `question` (LongBench's files call it
    `input`), `answers` a list, `all_classes` (trec's labels) kept."""
    question = record.get("question", record.get("input"))
    if question is None or "context" not in record or not isinstance(record.get("answers"), list):
        raise ValueError(f"{where}: a LongBench record needs context, input (or question) and a list of answers; "
                         f"this one has {sorted(record)}")
    return record | {"question": question, "all_classes": record.get("all_classes")}


def write_local_tasks(data_dir: str | os.PathLike, include_dir: str | os.PathLike, names=DATASETS) -> dict[str, str]:
    """Task configs reading local copies of `data_dir/<dataset>.jsonl`, for lm-eval's --include_path.

    Each config `include:`s lm-eval's own, so the prompt, generation and metric are lm-eval's; the records are
    copied into `include_dir` in the field names lm-eval's prompts use.

    Args:
      data_dir: the directory of `<dataset>.jsonl` files (`export_task_data`, or LongBench's data.zip).
      include_dir: where the configs and the rewritten data go; pass it as lm-eval's --include_path.
      names: the datasets.

    Returns:
      {dataset: local task name} (`task_name(dataset)` + LOCAL_SUFFIX).
    """
    check_datasets(names, data_dir)
    data_dir, include_dir = Path(data_dir), Path(include_dir).absolute()
    include_dir.mkdir(parents=True, exist_ok=True)
    tasks = {}
    for name in names:
        source = data_dir / f"{name}.jsonl"
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        records = [_task_record(json.loads(line), f"{source}:{i + 1}") for i, line in enumerate(lines)]
        data = include_dir / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tasks[name] = task_name(name) + LOCAL_SUFFIX
        config = [f"include: {lm_eval_tasks_dir() / 'longbench' / f'{name}.yaml'}", f"task: {tasks[name]}",
                  "tag: []", "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:",
                  f"    test: {data}", "test_split: test"]
        (include_dir / f"{tasks[name]}.yaml").write_text("\n".join(config) + "\n")
    return tasks


def task_scores(results: dict, tasks: dict[str, str]) -> dict[str, float]:
    """Each dataset's score in % from lm-eval's results (LongBench's metric of each dataset), and their mean.

    Args:
      results: lm-eval's output, with {"results": {task: {"score,none": ...}}}.
      tasks: {dataset: lm-eval task name}.

    Returns:
      {dataset: score in %} plus "mean": the unweighted mean over the datasets (Table 9's Avg.).
    """
    scores = {name: 100.0 * results["results"][task]["score,none"] for name, task in tasks.items()}
    return scores | {"mean": float(np.mean(list(scores.values())))}


def predictions(samples: dict, tasks: dict[str, str], n: int = 3) -> dict[str, list[dict]]:
    """The first `n` generations of each dataset beside their answers and score (to read what the model said).

    Args:
      samples: lm-eval's logged samples, {task: [sample, ...]}.
      tasks: {dataset: lm-eval task name}.
      n: samples kept per dataset.

    Returns:
      {dataset: [{"prediction", "answers", "score"}, ...]}.
    """
    return {name: [{"prediction": s["filtered_resps"][0], "answers": s["doc"]["answers"], "score": s["score"]}
                   for s in samples[task][:n]] for name, task in tasks.items()}


class Evaluator:
    """Runs LongBench datasets through lm-eval on in-memory models; lm-eval's task setup happens once.

    `evaluator(model, tokenizer)` -> (task_scores, {"results", "samples", "chat_template"}).

    Args:
      names: the datasets to run (some of DATASETS).
      data_dir: read <dataset>.jsonl files from here (`write_local_tasks`); None for the hub.
      limit: lm-eval's limit: at most this many samples per dataset; None for all.
      batch_size: the `MwjaxLM` batch size.
      max_length: prompts over this many tokens lose their middle (House of Cards: 7,500).
      chat_template: False never applies the tokenizer's template (True: as LongBench, `templated`).
      add_bos_token: `MwjaxLM`'s add_bos_token; None for the tokenizer's default.
      max_gen_toks: replaces every dataset's own generation length (quick checks, not the protocol); None keeps
        them.
    """

    def __init__(self, names=DATASETS, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                 batch_size: int = 8, max_length: int = MAX_LENGTH, chat_template: bool = True,
                 add_bos_token: bool | None = None, max_gen_toks: int | None = None):
        from lm_eval.tasks import TaskManager

        check_datasets(names, data_dir)
        self.limit, self.batch_size, self.max_length = limit, batch_size, max_length
        self.chat_template, self.add_bos_token = chat_template, add_bos_token
        self.gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None
        self._include = tempfile.TemporaryDirectory() if data_dir else None  # removed with the evaluator
        self.tasks = (write_local_tasks(data_dir, self._include.name, names) if data_dir
                      else {name: task_name(name) for name in names})
        # only LongBench's configs (or the local ones, which include them): lm-eval takes ~10 s to index all its tasks
        include = self._include.name if data_dir else str(lm_eval_tasks_dir() / "longbench")
        self.manager = TaskManager(include_path=include, include_defaults=False)

    def templated(self, tokenizer) -> list[str]:
        """The datasets whose prompt the tokenizer's chat template wraps (none if it has no template).

    Args:
      tokenizer: the model's HF tokenizer.

    Returns:
      Dataset names (those of this evaluator not in NO_CHAT_TEMPLATE), or [] without a template.
    """
        if not (self.chat_template and getattr(tokenizer, "chat_template", None)):
            return []
        return [name for name in self.tasks if name not in NO_CHAT_TEMPLATE]

    def __call__(self, model, tokenizer) -> tuple[dict, dict]:
        import lm_eval

        from mwjax.eval.lm_eval import MwjaxLM

        lm = MwjaxLM(model, tokenizer, batch_size=self.batch_size, add_bos_token=self.add_bos_token,
                     truncation="middle", max_prompt_length=self.max_length)
        longest = self.gen_kwargs["max_gen_toks"] if self.gen_kwargs else LONGEST_GENERATION
        if lm.max_length < self.max_length + longest:
            print(f"warning: the model's window ({lm.max_length} tokens) is shorter than max_length={self.max_length} "
                  f"plus up to {longest} generated tokens: prompts near max_length also lose their left end")
        templated = self.templated(tokenizer)
        # lm-eval applies a chat template to all tasks of a run or to none: one run per choice
        runs = {True: [self.tasks[n] for n in templated],
                False: [task for name, task in self.tasks.items() if name not in templated]}
        merged = {"results": {}, "samples": {}, "chat_template": templated}
        for apply, tasks in runs.items():
            if tasks:
                out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=self.manager, limit=self.limit,
                                              num_fewshot=0, apply_chat_template=apply, gen_kwargs=self.gen_kwargs,
                                              log_samples=True)
                merged["results"] |= out["results"]
                merged["samples"] |= out["samples"]
        return task_scores(merged, self.tasks), merged


def evaluate(model, tokenizer, names=DATASETS, **options) -> tuple[dict, dict]:
    """(task_scores, lm-eval's results and samples) of one model: `Evaluator(names, **options)(model, tokenizer)`.

    Args:
      model: an mwjax causal LM.
      tokenizer: its HF tokenizer.
      names: the datasets to run.
      options: `Evaluator`'s keyword arguments (data_dir, limit, batch_size, max_length, ...).

    Returns:
      ({dataset: score in %, "mean": ...}, {"results", "samples", "chat_template"}).
    """
    return Evaluator(names, **options)(model, tokenizer)
