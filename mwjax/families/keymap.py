"""Declarative key tables: HF checkpoint key <-> mwjax (NNX) parameter path (the machinery; the tables are
the families').

A rule pairs two templates; `{name}` placeholders match one dotted component and carry over,
e.g. `model.layers.{i}.mlp.{p}_proj.kernel` <-> `model.layers.{i}.mlp.{p}_proj.weight`.
`transpose=True` marks `nn.Linear` weights: HF stores [out, in], a Flax kernel is [in, out].

One HF tensor may hold several parameters:
- `concat`: it concatenates parameters along an axis (in HF layout), e.g. Phi-3's `qkv_proj`
  = [q_proj | k_proj | v_proj] rows; the part sizes come from the parameters' shapes.
- `stack`: its axis 0 runs over a placeholder of the parameter path, e.g. transformers-5 Mixtral's
  `mlp.experts.down_proj` [E, d, d_ff] holds `mlp.experts.{e}.down_proj` for every expert e.
Both together describe `mlp.experts.gate_up_proj` [E, 2 d_ff, d]. The loader reads the piece of
the tensor a parameter needs, `save_hf` assembles the tensor from its pieces.

Several rules may serve one parameter (a family read from more than one checkpoint layout): the
loader takes the first whose tensor the checkpoint has, `save_hf` always writes the first.

Each family's table lives in its folder (`mwjax/families/<family>/keys.py`), built from the rules every
family shares (`EMBED_AND_NORMS`, `ATTENTION`, `IGNORED`) and its own; its `Family` record holds it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Concat:
    """The HF tensor is the concatenation along `axis` (HF layout, after any stack axis is removed)
    of the parameters obtained by putting each of `parts` for placeholder `key` in the rule's path."""

    key: str
    parts: tuple[str, ...]
    axis: int = 0


@dataclasses.dataclass(frozen=True)
class Rule:
    """One line of a key table: an mwjax parameter path template <-> an HF checkpoint key template.

    `transpose` marks `nn.Linear` weights (HF [out, in], Flax kernel [in, out]); `stack` and `concat` mark an HF
    tensor that holds several parameters (module doc).
    """

    nnx: str
    hf: str
    transpose: bool = False
    stack: str | None = None  # placeholder of `nnx` that indexes axis 0 of the HF tensor
    concat: Concat | None = None

    def to_nnx(self, x: np.ndarray) -> np.ndarray:
        """HF layout -> mwjax layout (transposed for a Linear weight).

        Args:
          x: one parameter's piece of the HF tensor, e.g. a `down_proj.weight` [out, in].

        Returns:
          The parameter in mwjax layout, e.g. the kernel [in, out].
        """
        return x.T if self.transpose else x

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """mwjax layout -> HF layout (transposed for a Linear kernel).

        Args:
          x: the parameter in mwjax layout, e.g. a kernel [in, out].

        Returns:
          Its piece of the HF tensor, e.g. [out, in].
        """
        return x.T if self.transpose else x

    def hf_shape(self, nnx_shape: Sequence[int]) -> tuple[int, ...]:
        """The HF-layout shape of a parameter's piece (reversed for a Linear kernel).

        Args:
          nnx_shape: the parameter's shape in mwjax layout.

        Returns:
          The shape in HF layout.
        """
        return tuple(reversed(nnx_shape)) if self.transpose else tuple(nnx_shape)


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one parameter lives in a checkpoint: `tensor[index]` of HF tensor `hf_key` (shape `hf_shape`)."""

    hf_key: str
    rule: Rule
    index: tuple = ()  # () = the whole tensor
    hf_shape: tuple[int, ...] = ()

    def to_nnx(self, tensor: np.ndarray) -> np.ndarray:
        """The parameter, in mwjax layout, from the whole HF tensor.

        Args:
          tensor: the whole HF tensor `hf_key`, shape `hf_shape`.

        Returns:
          `tensor[index]` through the rule's `to_nnx`.
        """
        return self.rule.to_nnx(tensor[self.index] if self.index else tensor)


def _pattern(template: str, choices: Mapping[str, Sequence[str]] | None = None) -> re.Pattern:
    """Regex of a template; a placeholder listed in `choices` matches only those values."""
    choices = choices or {}
    parts = re.split(r"(\{\w+\})", template)

    def group(name: str) -> str:
        alternatives = "|".join(map(re.escape, choices[name])) if name in choices else r"[^.]+"
        return f"(?P<{name}>{alternatives})"

    regex = "".join(group(p[1:-1]) if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex + r"\Z")


class KeyMap:
    """A family's table of rules, queried in both directions."""

    def __init__(self, name: str, rules: Sequence[Rule], ignored_hf: Sequence[str] = ()):
        self.name = name
        self.rules = tuple(rules)
        self._nnx = [(_pattern(r.nnx, {r.concat.key: r.concat.parts} if r.concat else None), r) for r in self.rules]
        self._ignored = [_pattern(t) for t in ignored_hf]

    def plan(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[Location, ...]]:
        """Every parameter's candidate locations in a checkpoint, preferred first (the rules' order).

        Args:
          shapes: every parameter of the model, dotted path -> shape (mwjax layout); the shapes size the fused
            and stacked tensors.

        Returns:
          Dotted path -> its `Location`s; KeyError for a parameter no rule matches.
        """
        stack_sizes = self._stack_sizes(shapes)
        plan = {}
        for path, shape in shapes.items():
            candidates = tuple(self._locate(n, m.groupdict(), tuple(shape), shapes, stack_sizes)
                               for n, (pattern, _) in enumerate(self._nnx) if (m := pattern.match(path)))
            if not candidates:
                raise KeyError(f"{self.name} key table has no rule for parameter {path!r}")
            plan[path] = candidates
        return plan

    def ignored(self, hf_key: str) -> bool:
        """Whether `hf_key` is one that checkpoints carry but the model does not need (e.g. cached RoPE tables).

        Args:
          hf_key: a checkpoint tensor name.

        Returns:
          True when one of the table's ignored templates matches it.
        """
        return any(p.match(hf_key) for p in self._ignored)

    def _stack_sizes(self, shapes: Mapping[str, Sequence[int]]) -> dict[tuple[int, str], int]:
        """(rule number, HF key) -> length of the stack axis: how many values its placeholder takes."""
        sizes: dict[tuple[int, str], int] = {}
        for n, (pattern, rule) in enumerate(self._nnx):
            if rule.stack is None:
                continue
            for path in shapes:
                if m := pattern.match(path):
                    key = (n, rule.hf.format(**m.groupdict()))
                    sizes[key] = max(sizes.get(key, 0), int(m.group(rule.stack)) + 1)
        return sizes

    def _locate(self, number: int, groups: dict[str, str], shape: tuple[int, ...],
                shapes: Mapping[str, Sequence[int]], stack_sizes: Mapping[tuple[int, str], int]) -> Location:
        """The location of one parameter under rule `number` (its placeholders' values in `groups`)."""
        rule = self.rules[number]
        hf_key = rule.hf.format(**groups)
        full = list(rule.hf_shape(shape))
        index: list = []
        if rule.concat is not None:
            c = rule.concat
            sizes = [rule.hf_shape(shapes[rule.nnx.format(**(groups | {c.key: part}))])[c.axis] for part in c.parts]
            k = c.parts.index(groups[c.key])
            start = sum(sizes[:k])
            index = [slice(None)] * c.axis + [slice(start, start + sizes[k])]
            full[c.axis] = sum(sizes)
        if rule.stack is not None:
            index = [int(groups[rule.stack]), *index]
            full = [stack_sizes[(number, hf_key)], *full]
        return Location(hf_key=hf_key, rule=rule, index=tuple(index), hf_shape=tuple(full))


# ------------------------------------------------------------------ rules every family shares

EMBED_AND_NORMS = (  # embeddings, every RMSNorm (QK-norm included), the untied lm_head
    Rule("model.embed_tokens.embedding", "model.embed_tokens.weight"),
    Rule("model.layers.{i}.self_attn.{norm}.scale", "model.layers.{i}.self_attn.{norm}.weight"),  # QK-norm
    Rule("model.layers.{i}.{norm}.scale", "model.layers.{i}.{norm}.weight"),
    Rule("model.norm.scale", "model.norm.weight"),
    Rule("lm_head.kernel", "lm_head.weight", transpose=True),
)
ATTENTION = (  # q, k, v, o projections and their biases
    Rule("model.layers.{i}.self_attn.{p}.kernel", "model.layers.{i}.self_attn.{p}.weight", transpose=True),
    Rule("model.layers.{i}.self_attn.{p}.bias", "model.layers.{i}.self_attn.{p}.bias"),
)
# HF keys checkpoints may carry that no parameter needs: cached RoPE tables, a tied lm_head saved anyway
IGNORED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq", "lm_head.weight")


def fused_rules(fused: Mapping[str, Sequence[str]]) -> list[Rule]:
    """One concat rule per HF fused module of a decoder layer.

    E.g. Phi-3's `self_attn.qkv_proj.weight` = [q_proj | k_proj | v_proj] rows.

    Args:
      fused: HF fused module -> the mwjax modules in its row order, all under one parent module (paths relative
        to a decoder layer, e.g. {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", ...)});
        ValueError for parts of different parents.

    Returns:
      The concat `Rule`s (transposed Linear weights).
    """
    rules = []
    for hf_module, parts in fused.items():
        parents = {part.rpartition(".")[0] for part in parts}
        if len(parents) != 1:
            raise ValueError(f"fused module {hf_module} joins modules of different parents: {parts}")
        parent = parents.pop()
        rules.append(Rule(f"model.layers.{{i}}.{parent}.{{p}}.kernel", f"model.layers.{{i}}.{hf_module}.weight",
                          transpose=True, concat=Concat("p", tuple(part.rpartition(".")[2] for part in parts))))
    return rules
