"""Every numeric flag of every experiment declares its range, and a value outside it (0, a negative value, NaN) is
refused as the command line is parsed: exit status 2, a message naming the flag, before any model loads.

The experiments are discovered (every mwjax/experiments module with an absl command line) and their flags walked
in one fresh process (tests/flag_walk.py), so a flag added without a range fails here."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "mwjax" / "experiments"


NOT_ABSL = {"lm_eval_cli": "lm-eval's own argparse command line, with the mwjax backend registered"}


def experiments() -> list[str]:
    """The modules of mwjax/experiments with a command line (`python -m experiments.<name>`), but NOT_ABSL."""
    return sorted(p.stem for p in EXPERIMENTS.glob("*.py")
                  if 'if __name__ == "__main__":' in p.read_text() and p.stem not in NOT_ABSL)


def in_range(flag: dict, text: str) -> bool:
    """Whether `text` lies in the flag's declared range."""
    try:
        value = float(text)
    except ValueError:
        return False
    if not math.isfinite(value) or (flag["kind"] == "int" and value != int(value)):
        return False
    return ((flag["lower"] is None or value >= flag["lower"]) and (flag["upper"] is None or value <= flag["upper"])
            and (flag["above"] is None or value > flag["above"]))


@pytest.fixture(scope="module")
def walked():
    names = experiments()
    assert {"attacks", "prune", "super_weight", "zeroshot", "macdrop", "report"} <= set(names)
    walk = subprocess.Popen([sys.executable, str(Path(__file__).parent / "flag_walk.py"), *names],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = walk.communicate(timeout=300)
    assert walk.returncode == 0, err[-3000:]
    return json.loads(out)


def test_every_numeric_flag_declares_its_range_and_refuses_what_lies_outside(walked):
    problems, tried = [], 0
    for experiment, numeric in walked.items():
        for flag in numeric:
            if flag["kind"] == "spec":
                continue
            where = f"experiments.{experiment} --{flag['flag']}"
            if flag["kind"] == "int" and flag["lower"] is None:
                problems.append(f"{where}: an integer flag without a lower_bound")
            if flag["kind"] == "float" and not flag["finite"]:
                problems.append(f"{where}: a float flag that takes NaN (define it with cli.define_float)")
            for value, result in flag["results"].items():
                tried += 1
                if in_range(flag, value):
                    if result["status"] != 0:
                        problems.append(f"{where}={value} lies in its range but was refused: {result['stderr']}")
                elif result["status"] != 2 or not any(f"--{n}=" in result["stderr"] for n in flag["names"]):
                    problems.append(f"{where}={value} lies outside its range: exit status {result['status']}, "
                                    f"message {result['stderr']!r}")
    assert tried >= 150, tried  # every experiment's numeric flags, the shared ones included
    assert not problems, "\n".join(problems)


def test_number_specs_outside_their_range_are_refused(walked):
    specs = {(e, f["flag"]): f for e, numeric in walked.items() for f in numeric if f["kind"] == "spec"}
    assert ("zeroshot", "attack") in specs and ("prune", "sparsities") in specs
    for (experiment, name), flag in specs.items():
        for value, result in flag["results"].items():
            assert result["status"] == 2 and f"--{name}=" in result["stderr"] and value in result["stderr"], (
                experiment, name, value, result)


@pytest.mark.parametrize("name", experiments())
def test_each_experiment_parses_its_flags_with_cli_run(name):
    """__main__ runs the experiment through cli.run, whose parse_flags the walk above used."""
    tree = ast.parse((EXPERIMENTS / f"{name}.py").read_text())
    main_block = next(node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test))
    assert "cli.run(main)" in ast.unparse(main_block), f"experiments.{name} must call cli.run(main)"


@pytest.mark.parametrize("args, message", [
    (["experiments.attacks", "--seqlen=0"], "flag --seqlen=0: 0 is not integer >= 2"),
    (["experiments.zeroshot", "--attack=scale_super_weight:nan"], "the factor must be a finite number"),
    (["experiments.super_weight", "--row=3"], "--row without the rest: --layer, --row and --col name one"),
    (["experiments.macdrop", "--config=smollm2_135m", "--config.train.learning_rate=nan"],
     "config.train: learning_rate must be a finite number > 0"),
])
def test_the_command_line_exits_with_status_2_before_loading(args, message, tmp_path):
    out = subprocess.run([sys.executable, "-m", *args, "--model=/nonexistent" if "macdrop" not in args[0] else
                          "--config.model=/nonexistent"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_help_exits_with_status_0():
    """--help, --helpshort and --helpfull print the help on stdout and succeed (absl's own exit with status 1)."""
    result = subprocess.run([sys.executable, "-m", "experiments.probe", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--top_k" in result.stdout and "--model" in result.stdout
    full = subprocess.run([sys.executable, "-m", "experiments.probe", "--helpfull"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0 and len(full.stdout) > len(result.stdout)
    refused = subprocess.run([sys.executable, "-m", "experiments.probe", "--top_k=0"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "--top_k" in refused.stderr


def test_command_lines_define_their_flags_without_jax():
    """Every command line's module (its flags defined) imports without jax, flax, matplotlib, transformers or torch,
    which take ~5 s to import on a 2-core CPU: --help and a refused flag answer in about a second."""
    heavy = ("jax", "flax", "matplotlib", "transformers", "torch", "orbax", "optax")
    mains = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "mwjax").rglob("*.py")
                   if "cli.run(main)" in p.read_text())
    assert len(mains) >= 13 and "mwjax.converters.to_orbax" in mains
    check = ("import importlib, sys\nimportlib.import_module(sys.argv[1])\n"
             f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    runs = {name: subprocess.Popen([sys.executable, "-c", check, name], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in mains}
    loaded = {name: run.communicate(timeout=300) for name, run in runs.items()}
    assert {name: out.strip() or err[-500:] for name, (out, err) in loaded.items()} == {name: "[]" for name in mains}
