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


def test_every_name_the_readme_documents_resolves():
    """Each dotted `mwjax.*` name in the README (modules, functions, classes) imports or is an attribute of what
    does, so a move of a module cannot leave the README pointing at nothing."""
    import importlib

    names = set(re.findall(r"\bmwjax(?:\.[A-Za-z_]\w*)+", README.read_text()))
    names -= {"mwjax.sbatch"}  # launch/gpu_slurm.sh's job file, not a module
    assert len(names) > 10
    for name in sorted(names):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError:
                continue
        for attr in parts[i:]:
            assert hasattr(obj, attr), f"README names {name}: {'.'.join(parts[:i])} has no {attr!r}"
            obj = getattr(obj, attr)
    from mwjax import attacks, macdrop, masks, massive, models, peft, probes, prune  # noqa: F401  the flat API
    from mwjax.converters import load, save_hf  # noqa: F401
