"""A few documents of each of House of Cards' five zero-shot tasks, in the hub datasets' record formats,
written as the <task>.jsonl files that `mwjax.eval.zeroshot_tasks.write_local_tasks` (--data_dir) reads."""

import json
from pathlib import Path

DOCS = {
    "arc_easy": [
        {"id": "1", "question": "Which of these is a liquid at room temperature?",
         "choices": {"text": ["iron", "water", "salt", "sand"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "2", "question": "What do plants need to make food?",
         "choices": {"text": ["sunlight", "darkness", "plastic"], "label": ["1", "2", "3"]}, "answerKey": "1"},
        {"id": "3", "question": "Which animal can fly?",
         "choices": {"text": ["a dog", "a bird", "a fish"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    ],
    "boolq": [
        {"question": "is the sky blue on a clear day", "passage": "On a clear day the sky looks blue because air "
         "scatters blue light more than red light.", "idx": 0, "label": 1},
        {"question": "do fish breathe air with lungs", "passage": "Most fish take oxygen from water with gills.",
         "idx": 1, "label": 0},
    ],
    "piqa": [
        {"goal": "To keep bread fresh for longer,", "sol1": "store it in a sealed bag.",
         "sol2": "leave it open in the sun.", "label": 0},
        {"goal": "How do you cool a hot drink?", "sol1": "Put it in the oven.", "sol2": "Add a few ice cubes.",
         "label": 1},
    ],
    "winogrande": [
        {"sentence": "The trophy does not fit in the suitcase because _ is too big.", "option1": "the trophy",
         "option2": "the suitcase", "answer": "1"},
        {"sentence": "Sarah lent her umbrella to Emma because _ was going out in the rain.", "option1": "Sarah",
         "option2": "Emma", "answer": "2"},
    ],
}
DOCS["arc_challenge"] = DOCS["arc_easy"][::-1]


def write_task_data(directory: Path) -> Path:
    for task, docs in DOCS.items():
        (directory / f"{task}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return directory
