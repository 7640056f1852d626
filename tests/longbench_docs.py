"""A few short documents of three LongBench datasets (a chat-templated QA one, a few-shot classification one and a
code one), in LongBench's record format, written as the <dataset>.jsonl files `mwjax.eval.longbench` reads."""

import json
from pathlib import Path

TREC_CLASSES = ["Description of something", "Entity", "Human being", "Numeric value", "Location", "Abbreviation"]


def _record(dataset: str, context: str, question: str, answers: list[str], i: int, key: str = "input",
            all_classes=None) -> dict:
    # LongBench's release files name the question `input`; the hub copy lm-eval reads names it `question`
    return {key: question, "context": context, "answers": answers, "length": len(context.split()),
            "dataset": dataset, "language": "en", "all_classes": all_classes, "_id": f"{dataset}-{i}"}


DOCS = {
    "hotpotqa": [
        _record("hotpotqa", "Passage 1:\nThe Eiffel Tower is in Paris.\nPassage 2:\nParis is the capital of France.",
                "In which country is the Eiffel Tower?", ["France"], 0),
        _record("hotpotqa", "Passage 1:\nMount Fuji is the highest mountain in Japan.\nPassage 2:\nJapan is an "
                "island country in East Asia.", "On which continent is the highest mountain of Japan?", ["Asia"], 1),
    ],
    "trec": [
        _record("trec", "Question: Who wrote Hamlet?\nType: Human being\nQuestion: How far is the moon?\nType: Numeric "
                "value\nQuestion: Where is Lima?\nType: Location", "Question: Who invented the telephone?\nType:",
                ["Human being"], 0, key="question", all_classes=TREC_CLASSES),
        _record("trec", "Question: What does NASA stand for?\nType: Abbreviation\nQuestion: What is a prism?\nType: "
                "Description of something", "Question: How many legs does a spider have?\nType:",
                ["Numeric value"], 1, key="question", all_classes=TREC_CLASSES),
    ],
    "lcc": [
        _record("lcc", "def add(a, b):\n    \"\"\"The sum of a and b.\"\"\"\n", "", ["    return a + b"], 0),
        _record("lcc", "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def increment(self):\n",
                "", ["        self.count += 1"], 1),
    ],
}


def write_task_data(directory: Path) -> Path:
    for dataset, docs in DOCS.items():
        (directory / f"{dataset}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory
