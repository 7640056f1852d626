"""LoRA and DoRA adapters, computed as HF PEFT computes them (House of Cards fine-tunes with both).

    lora_model = peft.add_adapters(model, peft.LoraConfig(rank=16, alpha=16, dora=False))
    trainable = nnx.state(lora_model, peft.LoRAParam)          # only the adapters
    merged = peft.merge(lora_model)                            # plain model, adapters folded in
    peft.export_peft(lora_model, "adapter_dir")                 # HF PEFT `PeftModel.from_pretrained` loads it
    lora_model = peft.load_adapters(model, "adapter_dir")       # a PEFT dir, or one from peft.save_adapters

In mwjax's kernel layout (kernel = weight.T, [in, out]) with s = alpha / r (rsLoRA: alpha / sqrt(r)):

    LoRA  y = x W + b + s (x A) B                       A: lora_a [in, r] (PEFT lora_A.weight.T), kaiming-uniform
                                                        B: lora_b [r, out] (PEFT lora_B.weight.T), zeros
    DoRA  y = (m / n) * (x W + s (x A) B) + b,          m: lora_magnitude [out], initialised to n
          n = || W + s A B || over the input axis, recomputed from the current base weight every call
          and detached (no gradient), as PEFT's `DoraLinearLayer` does.

With LoRA dropout p > 0 in training, the adapter path sees dropout(x) (DoRA: PEFT's exact
three-term form). The base weights stay `nnx.Param` and are never trained; adapter weights are
`LoRAParam`, float32 by default.

Fused HF modules (`LoraConfig(fuse=True)`): HF Phi-3 computes q, k, v with one `qkv_proj` and
W_gate, W_up with one `gate_up_proj`, so PEFT (and LLaMA-Factory) put ONE adapter on each: lora_A
[r, in] shared, lora_B [q+k+v, r] (or [2 d_ff, r]) and DoRA's magnitude over the fused output rows.
mwjax keeps the projections apart (the family record's `fused_modules`); under fuse the adapters of one
fused module hold the same `lora_a` Variable (NNX keeps one copy in `nnx.state`, sums its gradient
over the uses, saves and restores it once) and each its rows of B and m. DoRA's norm is per output
row, so the fused module's norm is the split modules' norms side by side: the computation is PEFT's.

MacDrop: the FFN row mask reaches `columns`, which multiplies the masked PyTorch rows of the *base*
weight only (adapters are never masked) and, for DoRA, recomputes those rows' norm from the masked
weight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax import families
from mwjax.core import atomic
from mwjax.core.paths import dotted
from mwjax.core.sharding import param
from mwjax.instrument import masks
from mwjax.nn.layers import Linear

DEFAULT_EXCLUDE = ("lm_head",)
ROUTER_PATTERN = "*.mlp.gate"  # Mixtral's router (HF `block_sparse_moe.gate` / `mlp.gate`)


# An adapter parameter: the only kind the trainer differentiates and the optimizer updates. Flax's own, so that
# anything that knows Flax's LoRA (nnx.LoRA, nnx.state(model, nnx.LoRAParam)) sees mwjax's adapters too.
LoRAParam = nnx.LoRAParam


PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # an HF PEFT adapter
ADAPTER_AXES = (None, None)  # A [in, r] and B [r, out] are small: replicated on every device


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Adapter hyper-parameters (HF PEFT `LoraConfig` names in comments).

    targets: glob patterns over module paths (e.g. "*.self_attn.q_proj"); () = every linear layer
      except embeddings and `lm_head` (LLaMA-Factory's "all"; for Mixtral that includes the router,
      unless `exclude_router`).
    fuse: one adapter per HF fused module (Phi-3's `qkv_proj`, `gate_up_proj`), as PEFT / LLaMA-Factory
      adapt HF Phi-3 (module doc); needed by `export_peft` for those projections. Targets must then take
      a fused module's projections all or none. Refused for families without fused HF modules (a flag
      that did nothing would let a config believe it matched a fused PEFT layout), and with dropout > 0:
      PEFT draws one dropout mask for the fused module's input, which separate adapters here do not share.
    """

    rank: int = 16  # r
    alpha: float = 16.0  # lora_alpha
    dropout: float = 0.0  # lora_dropout
    dora: bool = False  # use_dora
    rslora: bool = False  # use_rslora: scaling alpha / sqrt(r)
    targets: tuple[str, ...] = ()  # target_modules
    exclude_router: bool = False
    param_dtype: str = "float32"
    fuse: bool = False  # (no PEFT field: PEFT adapts whatever modules the HF model has)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not _real(self.alpha) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not _real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must lie in [0, 1), got {self.dropout!r}")
        if self.fuse and self.dropout > 0:
            raise ValueError(f"LoRA dropout {self.dropout} with fuse=True: PEFT applies one dropout mask to a fused "
                             "module's input, which mwjax's separate q/k/v (gate/up) adapters cannot share; set "
                             "dropout=0 (LLaMA-Factory's default) or fuse=False")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _real(x) -> bool:
    """A real number (an int or a float; a bool or a string is not)."""
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


class LoRALinear(Linear):
    """A `Linear` whose base weight is frozen and whose output gains a LoRA (or DoRA) update."""

    def __init__(self, base: Linear, config: LoraConfig, *, rngs: nnx.Rngs, lora_a: LoRAParam | None = None):
        """lora_a: an A [in, r] to share (the other projections of a fused HF module); default a new one."""
        # the base's Variables are reused, not copied
        self.in_features, self.out_features, self.dtype = base.in_features, base.out_features, base.dtype
        self.kernel, self.bias = base.kernel, base.bias
        self.rank, self.scaling, self.use_dora = config.rank, config.scaling, config.dora
        pdtype = jnp.dtype(config.param_dtype)
        if lora_a is None:
            bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on lora_A.weight [r, in]
            lora_a = param(jax.random.uniform(rngs.params(), (self.in_features, self.rank), pdtype, -bound, bound),
                           ADAPTER_AXES, LoRAParam)
        elif lora_a[...].shape != (self.in_features, self.rank):
            raise ValueError(f"a shared lora_a of shape {lora_a[...].shape} does not fit a layer of "
                             f"{self.in_features} inputs at rank {self.rank}")
        self.lora_a = lora_a
        self.lora_b = param(jnp.zeros((self.rank, self.out_features), pdtype), ADAPTER_AXES, LoRAParam)
        self.lora_magnitude = param(self.weight_norm().astype(pdtype), (None,), LoRAParam) if self.use_dora else None
        self.lora_dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None

    # ---------------------------------------------------------------- pieces

    def _adapter_input(self, x: jax.Array) -> jax.Array:
        """PEFT casts the input to the adapters' dtype and applies dropout to it."""
        x = x.astype(self.lora_a[...].dtype)
        return x if self.lora_dropout is None else self.lora_dropout(x)

    def _lora(self, x: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        """s (x A) B, for all outputs or only `columns` [k]."""
        b = self.lora_b[...] if columns is None else self.lora_b[...][:, columns]
        return (x @ self.lora_a[...]) @ b * self.scaling

    def weight_norm(self, kernel: jax.Array | None = None, columns: jax.Array | None = None) -> jax.Array:
        """|| W + s A B || per output feature [out] (or per `columns`), detached, float32.

        kernel: the base kernel's columns to use ([in, out] or [in, k]); default the stored one. Expanded as
        ||w||^2 + 2 s <w, A b> + s^2 ||A b||^2 so that W + s A B is never materialised.
        """
        w = (self.kernel[...] if kernel is None else kernel).astype(jnp.float32)
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        if columns is not None:
            b = b[:, columns]
        s = self.scaling
        sq = jnp.sum(w * w, axis=0) + 2 * s * jnp.sum((w.T @ a) * b.T, axis=-1) + s * s * jnp.sum((a.T @ a) @ b * b, 0)
        return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))

    # ---------------------------------------------------------------- forward

    def _update(self, x: jax.Array, base: jax.Array, kernel: jax.Array, columns: jax.Array | None,
                norm_kernel: jax.Array | None = None) -> jax.Array:
        """What PEFT adds to the base layer's output (float32) for all outputs or `columns`.

        base: the base layer's output without bias [..., out|k]; kernel: the base kernel's columns in use.
        """
        xa = self._adapter_input(x)
        lora = self._lora(xa, columns)
        if not self.use_dora:
            return lora
        magnitude = self.lora_magnitude[...] if columns is None else self.lora_magnitude[...][columns]
        scale = magnitude / self.weight_norm(norm_kernel, columns)  # [out|k]
        if self.lora_dropout is not None and not self.lora_dropout.deterministic:
            base = xa @ kernel.astype(xa.dtype)  # PEFT recomputes the base term from dropout(x)
        return (scale - 1) * base.astype(jnp.float32) + scale * lora

    def _with_bias(self, y: jax.Array, columns: jax.Array | None = None) -> jax.Array:
        if self.bias is None:
            return y
        return y + (self.bias[...] if columns is None else self.bias[...][columns]).astype(y.dtype)

    def __call__(self, x: jax.Array, column_mask: masks.RowMask | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...]
        base = x @ kernel.astype(self.dtype)  # [..., out]
        y = self._with_bias(base)  # the base layer's output, in the compute dtype
        y = (y.astype(jnp.float32) + self._update(x, base, kernel, None)).astype(y.dtype)
        if column_mask is not None:
            y = y.at[..., column_mask.rows].set(self.columns(x, column_mask))
        return y

    def columns(self, x: jax.Array, mask: masks.RowMask) -> jax.Array:
        """The k masked outputs: the mask multiplies the base weight's rows only, never the adapters; DoRA's
        norm of those rows comes from the masked weight."""
        kernel = masks.masked_columns(self.kernel[...], mask)  # [in, k]
        base = x @ kernel.astype(self.dtype)
        y = self._with_bias(base, mask.rows)
        return (y.astype(jnp.float32) + self._update(x, base, kernel, mask.rows, kernel)).astype(y.dtype)

    @classmethod
    def grouped(cls, layers, x: jax.Array, group_sizes: jax.Array, groups: jax.Array, column_masks) -> jax.Array:
        """`Linear.grouped` with each layer's adapter (Mixtral's routed experts): the base, A and B products as
        ragged matmuls over the stacked weights; per row what `layers[groups[r]]` computes with its mask
        (dropout from that layer's own stream, DoRA's norm from its masked weight)."""
        first, n = layers[0], len(layers)
        x = x.astype(first.dtype)
        kernels = [layer.masked_kernel(m) for layer, m in zip(layers, column_masks, strict=True)]  # [in, out] each
        ragged = lambda lhs, rhs: jax.lax.ragged_dot(lhs, jnp.stack(rhs).astype(lhs.dtype), group_sizes)
        per_row = lambda values: jnp.stack(values)[groups]  # [g, ...] -> [n, ...]
        base = ragged(x, kernels)  # [n, out]
        y = base if first.bias is None else base + per_row([layer.bias[...] for layer in layers]).astype(base.dtype)
        xa = x.astype(first.lora_a[...].dtype)
        dropping = first.lora_dropout is not None and not first.lora_dropout.deterministic
        if dropping:  # each row takes the dropout of its own layer's stream
            xa = functools.reduce(lambda acc, e: jnp.where((groups == e)[:, None], layers[e].lora_dropout(xa), acc),
                                  range(n), xa)
        update = ragged(ragged(xa, [layer.lora_a[...] for layer in layers]),
                        [layer.lora_b[...] for layer in layers]) * first.scaling
        if first.use_dora:
            scale = per_row([layer.lora_magnitude[...] / layer.weight_norm(k) for layer, k in zip(layers, kernels,
                                                                                                strict=True)])
            if dropping:
                base = ragged(xa, kernels)  # PEFT recomputes the base term from dropout(x)
            update = (scale - 1) * base.astype(jnp.float32) + scale * update
        return (y.astype(jnp.float32) + update).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """W + s A B (LoRA) or (m / n) * (W + s A B) (DoRA), in the base kernel's dtype."""
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32) * self.scaling
        w = self.kernel[...].astype(jnp.float32) + delta
        if self.use_dora:
            w = w * (self.lora_magnitude[...] / self.weight_norm())[None, :]
        return w.astype(self.kernel[...].dtype)


# -------------------------------------------------------------------------------------------- targets


def linear_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of every `Linear` in the model (HF module names)."""
    return [".".join(map(str, path)) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def fused_groups(model: nnx.Module, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """HF fused module path -> the paths of its projections (in its output-row order) for every fused module
    that any of `paths` belongs to, e.g. "model.layers.0.self_attn.qkv_proj" -> (...q_proj, ...k_proj, ...v_proj)
    (the family record's `fused_modules`); {} for a family without fused HF modules."""
    groups = {}
    for path in paths:
        for hf_module, parts in families.family(model.config.model_type).fused_modules.items():
            for part in parts:
                if path.endswith("." + part):
                    prefix = path[: -len(part)]
                    groups[prefix + hf_module] = tuple(prefix + p for p in parts)
    return groups


def _check_fused(model: nnx.Module, chosen: list[str]) -> None:
    """Under fuse, every fused HF module is adapted whole or not at all."""
    model_type = model.config.model_type
    if not families.family(model.config.model_type).fused_modules:
        fusing = sorted(f.model_type for f in families.families() if f.fused_modules)
        raise ValueError(f"LoraConfig(fuse=True) ties the adapters of projections that HF fuses into one module; HF "
                         f"{model_type} fuses none (only {fusing} do): set fuse=False")
    for hf_path, members in fused_groups(model, chosen).items():
        missing = [m for m in members if m not in chosen]
        if missing:
            names = ", ".join(m.rpartition(".")[2] for m in members)
            raise ValueError(f"with fuse=True HF's {hf_path} is one PEFT module over {names}, but the LoRA targets "
                             f"leave out {missing}: target all of them (e.g. '*.self_attn.[qkv]_proj', "
                             "'*.mlp.gate_proj' with '*.mlp.up_proj') or none, or set fuse=False")


def select_targets(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module paths that get adapters; an error names any pattern that matches nothing, and (under
    `config.fuse`) a fused HF module that the targets take only in part."""
    paths = linear_paths(model)
    if config.targets:
        unmatched = [p for p in config.targets if not any(fnmatch.fnmatchcase(path, p) for path in paths)]
        if unmatched:
            raise ValueError(f"LoRA target patterns {unmatched} match no linear layer (layers look like: "
                             f"{', '.join(paths[:6])}, ...)")
        chosen = [path for path in paths if any(fnmatch.fnmatchcase(path, p) for p in config.targets)]
    else:
        chosen = [path for path in paths if path.split(".")[-1] not in DEFAULT_EXCLUDE]
    if config.exclude_router:
        chosen = [path for path in chosen if not fnmatch.fnmatchcase(path, ROUTER_PATTERN)]
    if not chosen:
        raise ValueError("no linear layer left to adapt")
    if config.fuse:
        _check_fused(model, chosen)
    return chosen


def _get(root: nnx.Module, path: Sequence):
    node = root
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def _set(root: nnx.Module, path: Sequence, value) -> None:
    parent, last = _get(root, path[:-1]), path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def _split_path(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def add_adapters(model: nnx.Module, config: LoraConfig, seed: int = 0) -> nnx.Module:
    """A copy of `model` whose target linear layers carry adapters (the input model is untouched)."""
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
        raise ValueError("this model already carries adapters; merge() them first or start from the base model")
    targets = select_targets(model, config)
    out = nnx.clone(model)
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    # under fuse: projection path -> its fused module, whose first adapter made makes the shared A
    group_of = {m: hf for hf, members in fused_groups(model, targets).items() for m in members} if config.fuse else {}
    shared: dict[str, LoRAParam] = {}
    for path in targets:
        parts = _split_path(path)
        group = group_of.get(path)
        layer = LoRALinear(_get(out, parts), config, rngs=rngs, lora_a=shared.get(group))
        if group is not None:
            shared.setdefault(group, layer.lora_a)
        _set(out, parts, layer)
    out.lora_config = config
    return out


def adapters(model: nnx.Module) -> dict[str, LoRALinear]:
    return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def merge(model: nnx.Module) -> nnx.Module:
    """A copy with every adapter folded into its base weight (plain `Linear` layers again)."""
    out = nnx.clone(model)
    for path, layer in adapters(out).items():
        kernel = layer.merged_kernel()
        plain = nnx.eval_shape(lambda layer=layer, kernel=kernel: Linear(
            layer.in_features, layer.out_features, axes=layer.axes, use_bias=layer.bias is not None,
            dtype=layer.dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
        plain.kernel = param(kernel, layer.axes)
        plain.bias = layer.bias
        _set(out, _split_path(path), plain)
    if hasattr(out, "lora_config"):
        del out.lora_config
    return out


# -------------------------------------------------------------------------------------------- export


def export_peft(model: nnx.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                gguf_file: str | None = None) -> Path:
    """Write an HF PEFT adapter directory as `PeftModel.save_pretrained` does: adapter_config.json,
    adapter_model.safetensors and a README.md model card, directory-atomic (`mwjax.core.atomic`: a kill leaves the
    previous adapter or this one; an existing directory is replaced only when it holds a PEFT adapter).

    base_model_name_or_path: what `AutoPeftModelForCausalLM.from_pretrained(directory)` loads the base from (a
    hub id or an HF directory); with `gguf_file` (a GGUF base, which PEFT cannot name) the card says to pass
    `gguf_file=` to it. target_modules are PEFT's short names ("q_proj", ...) when they select exactly the
    adapted modules, else the full module paths.

    Module paths are HF's. Adapters made with `LoraConfig(fuse=True)` are written as PEFT's adapter of
    each fused HF module (Phi-3: `self_attn.qkv_proj.lora_A.weight` [r, in], `lora_B.weight` [q+k+v, r]
    = the projections' B stacked in row order, DoRA's `lora_magnitude_vector` likewise). Separate
    adapters on projections HF fuses have no PEFT target and are refused, as are transformers 5's
    stacked Mixtral experts.
    """
    from safetensors.numpy import save_file

    config: LoraConfig = model.lora_config
    modules = _peft_modules(model)
    tensors = {}
    for peft_path, layers in modules.items():
        prefix = f"base_model.model.{peft_path}"
        tensors[f"{prefix}.lora_A.weight"] = np.asarray(layers[0].lora_a[...]).T  # [r, in]
        tensors[f"{prefix}.lora_B.weight"] = np.concatenate([np.asarray(m.lora_b[...]).T for m in layers])  # [out, r]
        if config.dora:
            tensors[f"{prefix}.lora_magnitude_vector"] = np.concatenate([np.asarray(m.lora_magnitude[...])
                                                                         for m in layers])  # [out]
    # safetensors writes the raw buffer: a transposed (Fortran-order) array would be stored scrambled
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "use_dora": config.dora, "use_rslora": config.rslora, "bias": "none",
        "target_modules": _target_modules(model, list(modules)), "fan_in_fan_out": False,
        "init_lora_weights": True, "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    if version := _installed("peft"):
        peft_config["peft_version"] = version
    directory = Path(directory)
    with atomic.atomic_directory(directory, replaces=PEFT_FILES, what="an HF PEFT adapter") as staging:
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        (staging / "README.md").write_text(_model_card(config, base_model_name_or_path, gguf_file))
    return directory


def _installed(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _target_modules(model: nnx.Module, peft_paths: list[str]) -> list[str]:
    """PEFT's short target names when each selects every module of that name in the HF model and nothing else
    (PEFT matches a name against the end of each module path), else the full paths."""
    fused = _fused_paths(model) if model.lora_config.fuse else {}
    members = {m for group in fused.values() for m in group}
    hf_paths = [p for p in linear_paths(model) if p not in members] + list(fused)
    short = lambda path: path.rpartition(".")[2]
    names = sorted({short(p) for p in peft_paths})
    exact = all(sum(short(p) == n for p in peft_paths) == sum(short(p) == n for p in hf_paths) for n in names)
    return names if exact else sorted(peft_paths)


def _model_card(config: LoraConfig, base: str | None, gguf_file: str | None) -> str:
    """A PEFT-style README.md: the base model, how to load the adapter, what it is."""
    kind = "DoRA" if config.dora else "LoRA"
    extra = f', gguf_file="{gguf_file}"' if gguf_file else ""
    lines = ["---", f"base_model: {base}" if base else "base_model: null", "library_name: peft", "tags:",
             f"- {kind.lower()}", "- mwjax", "---", "", f"# {kind} adapter (exported by mwjax)", "",
             f"{kind}, rank {config.rank}, alpha {config.alpha:g}{', rsLoRA scaling' if config.rslora else ''}.",
             "", "```python", "from peft import AutoPeftModelForCausalLM", "",
             f'model = AutoPeftModelForCausalLM.from_pretrained("<this directory>"{extra})', "```"]
    if gguf_file:
        lines += ["", f"The base is the GGUF file `{gguf_file}` in `{base}`: transformers dequantizes it when "
                  "`gguf_file` is passed (PEFT's config cannot name a file)."]
    elif base is None:
        lines += ["", "No base model was recorded: load the base yourself and use `PeftModel.from_pretrained(base, "
                  "\"<this directory>\")`."]
    return "\n".join(lines) + "\n"


def _peft_modules(model: nnx.Module) -> dict[str, list[LoRALinear]]:
    """HF module path -> the adapters it holds (one, or a fused module's, in row order sharing one lora_a);
    refuses adapters that HF PEFT could not load."""
    layers = adapters(model)
    groups = fused_groups(model, layers) if model.lora_config.fuse else {}
    grouped = {m for members in groups.values() for m in members}
    alone = [p for p in layers if p not in grouped and fused_groups(model, [p])]
    architecture = families.family(model.config.model_type).architecture
    if alone:
        hf = ", ".join(fused_groups(model, alone[:1]))
        raise ValueError(f"HF {architecture} fuses {alone[0]} with other projections ({hf}): PEFT has "
                         "no module for it alone. Build the adapters with LoraConfig(fuse=True) (one adapter per fused "
                         "module, as PEFT and LLaMA-Factory adapt HF Phi-3), or merge() and save_hf instead")
    experts = [p for p in layers if ".experts." in p]
    if experts:
        raise ValueError(f"HF {architecture} has no separate module for {experts[:3]}...: PEFT "
                         "cannot load adapters on them; merge() and save_hf instead, or target other layers")
    modules = {hf: [layers[m] for m in members] for hf, members in groups.items()}
    modules |= {p: [layer] for p, layer in layers.items() if p not in grouped}
    for hf, members in modules.items():
        if any(m.lora_a is not members[0].lora_a for m in members):
            raise ValueError(f"the adapters of fused module {hf} do not share one lora_a; build them with "
                             "add_adapters(..., LoraConfig(fuse=True))")
    return modules


class AdapterError(ValueError):
    """An adapter that cannot be loaded onto this base model as it is: the message names the adapter's file (or
    directory) and the module."""


PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0}  # HF PEFT LoraConfig's defaults
_PEFT_UNSUPPORTED = {  # adapter_config.json field -> (the value mwjax implements, what it would change)
    "rank_pattern": ({}, "a rank per module"), "alpha_pattern": ({}, "an alpha per module"),
    "fan_in_fan_out": (False, "GPT-2 Conv1D weights"), "bias": ("none", "trained biases"),
    "modules_to_save": (None, "fully trained modules"), "lora_bias": (False, "a trained bias on lora_B"),
}


def _peft_config(adapter_dir: Path) -> LoraConfig:
    """adapter_config.json as a LoraConfig, every value checked; an AdapterError names the file and the field."""
    path = adapter_dir / "adapter_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise AdapterError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, not {type(raw).__name__}")
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {raw['peft_type']!r} is not LoRA/DoRA; mwjax loads only those")
    for field, (implemented, meaning) in _PEFT_UNSUPPORTED.items():
        value = raw.get(field)
        if not (value is None or value == implemented or (isinstance(value, list | dict) and not value)):
            raise AdapterError(f"{path}: {field}={value!r} ({meaning}) is not implemented by mwjax's LoRA/DoRA; only "
                               "adapters without it load")
    values = PEFT_DEFAULTS | {k: raw[k] for k in PEFT_DEFAULTS if raw.get(k) is not None}
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(raw.get(flag, False), bool | None):
            raise AdapterError(f"{path}: {flag} must be true or false, not {raw[flag]!r}")
    try:
        return LoraConfig(rank=values["r"], alpha=values["lora_alpha"], dropout=values["lora_dropout"],
                          dora=bool(raw.get("use_dora")), rslora=bool(raw.get("use_rslora")))
    except ValueError as e:  # rank, alpha or dropout out of range
        names = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
        field = next((peft for ours, peft in names.items() if f"LoRA {ours}" in str(e)), "a value")
        raise AdapterError(f"{path}: {field}: {e}") from e


_PEFT_PARTS = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_magnitude_vector.weight", "m"),
               (".lora_magnitude_vector", "m"))
_PART_NAMES = {"A": "lora_A.weight", "B": "lora_B.weight", "m": "lora_magnitude_vector"}


def _peft_tensors(weights: Path) -> dict[str, dict[str, np.ndarray]]:
    """HF module path -> {"A": lora_A [r, in], "B": lora_B [out, r], "m": magnitude [out] (DoRA)} from a PEFT
    adapter_model.safetensors, each tensor checked: a LoRA tensor, floating point, finite, of the right rank,
    and A and B both present (AdapterError naming the file, the module and the tensor)."""
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(weights))
    except Exception as e:  # SafetensorError, OSError, numpy refusing the bytes
        raise AdapterError(f"{weights} is not a valid safetensors file ({type(e).__name__}: {e})") from e
    modules: dict[str, dict[str, np.ndarray]] = {}
    for key, value in raw.items():
        name = key.removeprefix("base_model.model.")
        part = next(((name[: -len(suffix)], p) for suffix, p in _PEFT_PARTS if name.endswith(suffix)), None)
        if part is None:
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA/DoRA tensor (lora_A / lora_B / "
                               "lora_magnitude_vector); mwjax loads only those (no PEFT bias or modules_to_save)")
        module, p = part
        _check_adapter_tensor(value, f"{weights}: module {module}'s {_PART_NAMES[p]}", 1 if p == "m" else 2)
        modules.setdefault(module, {})[p] = value
    if not modules:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    for module, parts in sorted(modules.items()):
        missing = [_PART_NAMES[p] for p in ("A", "B") if p not in parts]
        if missing:
            raise AdapterError(f"{weights}: module {module}'s adapter has no {' / '.join(missing)}: an adapter is "
                               "an A and a B; the file is incomplete")
    return modules


def _check_adapter_tensor(value, what: str, ndim: int) -> None:
    """Floating point, `ndim` dimensions, every value finite; AdapterError starting with `what` otherwise."""
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise AdapterError(f"{what} is stored as {value.dtype}, not a floating-point type; the adapter is corrupt")
    if value.ndim != ndim:
        raise AdapterError(f"{what} has shape {tuple(value.shape)}, not {ndim}-D; the adapter is corrupt")
    finite = np.isfinite(np.asarray(value, np.float32))
    if not finite.all():
        raise AdapterError(f"{what} holds {int(finite.size - finite.sum())} NaN / inf values; the adapter is corrupt "
                           "(a diverged training run?)")


def load_peft(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """`model` (a base model) with the HF PEFT LoRA/DoRA adapter in `directory` attached
    (`PeftModel.from_pretrained`); adapters written by `export_peft` or by HF PEFT itself.

    Nothing is trusted: the config's r / lora_alpha / lora_dropout must lie in their range, every tensor must
    be a floating-point, finite lora_A / lora_B (/ DoRA magnitude) of a module the base model has, with the
    config's rank and the module's shape; an AdapterError names the file and the module otherwise.
    """
    directory = Path(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file() or not (directory / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a PEFT adapter directory (adapter_config.json + "
                                "adapter_model.safetensors)")
    config = _peft_config(directory)
    tensors = _peft_tensors(weights)
    paths = sorted(tensors)
    # a fused HF module (Phi-3 qkv_proj / gate_up_proj) -> its projections; any other module -> itself
    fused = _fused_paths(model)
    known = set(linear_paths(model)) | set(fused)
    unknown = [path for path in paths if path not in known]
    if unknown:
        raise AdapterError(f"{weights}: module {unknown[0]} (of {len(unknown)} adapted modules the base model lacks) "
                           f"is not a linear layer of the base {model.config.model_type} model (layers look like "
                           f"{', '.join(linear_paths(model)[:2])}): an adapter of another base model?")
    members = {path: fused.get(path, (path,)) for path in paths}
    if fuse := any(path in fused for path in paths):
        if config.dropout > 0:  # only training sees dropout; the loaded adapter computes PEFT's eval output
            warnings.warn(f"{directory}: LoRA dropout {config.dropout} dropped: mwjax's fused adapters carry none "
                          "(LoraConfig(fuse=True)), so further training of this adapter runs without it", stacklevel=2)
        config = dataclasses.replace(config, dropout=0.0)
    config = dataclasses.replace(config, fuse=fuse, targets=tuple(m for path in paths for m in members[path]))
    out = add_adapters(model, config)
    layers = adapters(out)
    for path in paths:
        group = [layers[m] for m in members[path]]
        a, b = tensors[path]["A"].T, tensors[path]["B"].T  # [in, r], [r, out]
        rows = np.cumsum([0] + [layer.out_features for layer in group])
        if a.shape != group[0].lora_a[...].shape or b.shape != (config.rank, rows[-1]):
            raise AdapterError(f"{weights}: module {path}: lora_A / lora_B of shapes {a.shape[::-1]} / "
                               f"{b.shape[::-1]} do not fit the layer [{group[0].in_features} -> {rows[-1]}] at "
                               f"r={config.rank} (adapter_config.json): another base model, or another r?")
        magnitude = tensors[path].get("m")
        if config.dora != (magnitude is not None):
            raise AdapterError(f"{weights}: module {path} {'has no' if config.dora else 'has a'} "
                               f"lora_magnitude_vector but adapter_config.json says use_dora={config.dora}")
        if config.dora and magnitude.shape != (rows[-1],):
            raise AdapterError(f"{weights}: module {path}: lora_magnitude_vector of shape {magnitude.shape} does "
                               f"not fit the layer's {rows[-1]} outputs (another base model?)")
        for layer, start, stop in zip(group, rows[:-1], rows[1:], strict=True):
            layer.lora_a[...] = jnp.asarray(a, layer.lora_a[...].dtype)  # the same Variable within a fused group
            layer.lora_b[...] = jnp.asarray(b[:, start:stop], layer.lora_b[...].dtype)
            if layer.use_dora:
                layer.lora_magnitude[...] = jnp.asarray(magnitude[start:stop], layer.lora_magnitude[...].dtype)
    return out


def _fused_paths(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """Every HF fused module path of `model` -> its projections' paths (`fused_groups` over all linear layers)."""
    return fused_groups(model, linear_paths(model))


ADAPTER_ITEM, LORA_CONFIG_ITEM = "adapters", "lora_config"


def save_adapters(model: nnx.Module, directory: str | os.PathLike) -> Path:
    """Write only the adapters (and their LoraConfig, with the adapted paths) as an orbax checkpoint,
    atomically; `load_adapters` puts them back on the same base model."""
    import orbax.checkpoint as ocp

    from mwjax.converters import checkpoint

    config = dataclasses.replace(model.lora_config, targets=tuple(adapters(model)))
    params = nnx.to_pure_dict(nnx.state(model, LoRAParam))
    return checkpoint.save_items(directory, {ADAPTER_ITEM: ocp.args.StandardSave(params),
                                             LORA_CONFIG_ITEM: ocp.args.JsonSave(dataclasses.asdict(config))},
                                 overwrite=True)


def load_adapters(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """`model` with the adapters of `directory`: an HF PEFT directory (`load_peft`) or one written by
    `save_adapters` (orbax), checked as `load_peft` checks: a LoraConfig in range, adapted modules the base
    model has, every stored array of the shape this base needs (before orbax reads it), floating point and
    finite; an AdapterError names the directory and the module otherwise."""
    import orbax.checkpoint as ocp

    from mwjax.converters import checkpoint

    directory = checkpoint.recover(directory)
    if (directory / "adapter_config.json").is_file():
        return load_peft(model, directory)
    if not (directory / ADAPTER_ITEM).is_dir():
        raise FileNotFoundError(f"{directory} holds neither a PEFT adapter (adapter_config.json) nor mwjax "
                                "adapters (written by mwjax.peft.save_adapters)")
    handler = ocp.CompositeCheckpointHandler(**{ADAPTER_ITEM: ocp.StandardCheckpointHandler(),
                                                LORA_CONFIG_ITEM: ocp.JsonCheckpointHandler()})
    with ocp.Checkpointer(handler) as ckptr:
        raw = ckptr.restore(directory, args=ocp.args.Composite(**{LORA_CONFIG_ITEM: ocp.args.JsonRestore()}))
        config = _orbax_config(raw[LORA_CONFIG_ITEM], directory)
        try:
            out = add_adapters(model, config)
        except ValueError as e:  # a target the base model lacks, a fused group it splits otherwise
            raise AdapterError(f"{directory}: its adapters do not fit the base {model.config.model_type} model ({e}):"
                               " adapters of another base model?") from e
        state = nnx.state(out, LoRAParam)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
        _check_stored(ckptr.metadata(directory).item_metadata[ADAPTER_ITEM], target, directory)
        restored = ckptr.restore(directory, args=ocp.args.Composite(**{ADAPTER_ITEM: ocp.args.StandardRestore(target)}))
    for path, value in jax.tree_util.tree_leaves_with_path(restored[ADAPTER_ITEM]):
        module, _, name = dotted(path).rpartition(".")
        _check_adapter_tensor(np.asarray(value), f"{directory}: module {module}'s {name}", value.ndim)
    nnx.replace_by_pure_dict(state, restored[ADAPTER_ITEM])
    nnx.update(out, state)
    return out


def _orbax_config(raw, directory: Path) -> LoraConfig:
    """The LoraConfig stored by `save_adapters`, checked (AdapterError naming the directory)."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    if not isinstance(raw, dict) or set(raw) - fields:
        extra = sorted(set(raw) - fields) if isinstance(raw, dict) else type(raw).__name__
        raise AdapterError(f"{directory}/{LORA_CONFIG_ITEM}: not a LoraConfig written by mwjax.peft.save_adapters "
                           f"(unknown {extra})")
    try:
        return LoraConfig(**raw)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{directory}/{LORA_CONFIG_ITEM}: {e}") from e


def _check_stored(stored, target, directory: Path) -> None:
    """Every adapter array the base model needs (`target`: ShapeDtypeStructs) is stored, with its shape and a
    floating-point dtype, and nothing else is (`stored`: orbax's metadata tree); AdapterError naming the module."""

    have = {dotted(path): meta for path, meta in jax.tree_util.tree_leaves_with_path(stored)}
    need = {dotted(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for name in sorted(set(need) | set(have)):
        module, _, part = name.rpartition(".")
        if name not in have or name not in need:
            why = "is missing" if name not in have else "is stored, but the base model has no such adapter"
            raise AdapterError(f"{directory}: module {module}'s {part} {why}: adapters of another base model?")
        shape, want = tuple(have[name].shape), tuple(need[name].shape)
        if shape != want:
            raise AdapterError(f"{directory}: module {module}'s {part} is stored with shape {shape}, but this base "
                               f"model's layer needs {want}: adapters of another base model (another width)?")
        if not jnp.issubdtype(have[name].dtype, jnp.floating):
            raise AdapterError(f"{directory}: module {module}'s {part} is stored as {have[name].dtype}, not a "
                               "floating-point type; the adapter is corrupt")
