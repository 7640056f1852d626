"""Declarative key tables: HF checkpoint key <-> mwjax (NNX) parameter path, per family.

A rule pairs two templates; `{name}` placeholders match one dotted component and carry over,
e.g. `model.layers.{i}.mlp.{p}_proj.kernel` <-> `model.layers.{i}.mlp.{p}_proj.weight`.
`transpose=True` marks `nn.Linear` weights: HF stores [out, in], a Flax kernel is [in, out].
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Rule:
    nnx: str
    hf: str
    transpose: bool = False

    def to_nnx(self, x: np.ndarray) -> np.ndarray:
        return x.T if self.transpose else x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return x.T if self.transpose else x

    def hf_shape(self, nnx_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(reversed(nnx_shape)) if self.transpose else tuple(nnx_shape)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    regex = "".join(f"(?P<{p[1:-1]}>[^.]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


class KeyMap:
    """A family's table of rules, queried in both directions."""

    def __init__(self, name: str, rules: Sequence[Rule], ignored_hf: Sequence[str] = ()):
        self.name = name
        self.rules = tuple(rules)
        self._nnx = [(_pattern(r.nnx), r) for r in self.rules]
        self._hf = [(_pattern(r.hf), r) for r in self.rules]
        self._ignored = [_pattern(t) for t in ignored_hf]

    def to_hf(self, nnx_path: str) -> tuple[str, Rule]:
        for pattern, rule in self._nnx:
            if m := pattern.match(nnx_path):
                return rule.hf.format(**m.groupdict()), rule
        raise KeyError(f"{self.name} key table has no rule for parameter {nnx_path!r}")

    def to_nnx(self, hf_key: str) -> tuple[str, Rule] | None:
        for pattern, rule in self._hf:
            if m := pattern.match(hf_key):
                return rule.nnx.format(**m.groupdict()), rule
        return None

    def ignored(self, hf_key: str) -> bool:
        """Keys that checkpoints carry but the model does not need (e.g. cached RoPE tables)."""
        return any(p.match(hf_key) for p in self._ignored)


LLAMA = KeyMap(
    "llama",
    [
        Rule("model.embed_tokens.embedding", "model.embed_tokens.weight"),
        Rule("model.layers.{i}.self_attn.{p}.kernel", "model.layers.{i}.self_attn.{p}.weight", transpose=True),
        Rule("model.layers.{i}.self_attn.{p}.bias", "model.layers.{i}.self_attn.{p}.bias"),
        Rule("model.layers.{i}.mlp.{p}.kernel", "model.layers.{i}.mlp.{p}.weight", transpose=True),
        Rule("model.layers.{i}.mlp.{p}.bias", "model.layers.{i}.mlp.{p}.bias"),
        Rule("model.layers.{i}.{norm}.scale", "model.layers.{i}.{norm}.weight"),
        Rule("model.norm.scale", "model.norm.weight"),
        Rule("lm_head.kernel", "lm_head.weight", transpose=True),
    ],
    ignored_hf=["model.layers.{i}.self_attn.rotary_emb.inv_freq", "lm_head.weight"],
)

KEYMAPS = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA}
