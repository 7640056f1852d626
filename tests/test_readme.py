"""The README's tour, run as the script a reader would paste it into."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def tour() -> str:
    """The python block under '## A short tour'."""
    section = README.read_text().split("## A short tour", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_tour_runs_and_prints_what_it_computes(tmp_path):
    (tmp_path / "tour.py").write_text(tour())
    out = subprocess.run([sys.executable, "tour.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "next token: ' Paris'" in out.stdout
    assert "massive weights: layer 12 (HF layers[11]) (1229, 1487" in out.stdout
    assert "original perplexity:" in out.stdout and "top-5 zeroed perplexity:" in out.stdout
    import transformers

    # the saved directory is complete: transformers loads the tokenizer as well as the model
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "hf").bos_token_id == 1
