"""Which Linear layers of a model get adapters, attaching them (`add_adapters`) and folding them back in (`merge`).

Module paths are HF's ("model.layers.0.self_attn.q_proj"); fused HF modules (Phi-3's `qkv_proj`, `gate_up_proj`)
come from the family record's `fused_modules`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from flax import nnx

from mwjax import families
from mwjax.adapters.lora import LoraConfig, LoRALinear, LoRAParam
from mwjax.core import paths
from mwjax.core.sharding import param
from mwjax.nn.layers import Linear

DEFAULT_EXCLUDE = ("lm_head",)
ROUTER_PATTERN = "*.mlp.gate"  # Mixtral's router (HF `block_sparse_moe.gate` / `mlp.gate`)


def linear_paths(model: nnx.Module) -> list[str]:
    """Dotted paths of every `Linear` in the model (HF module names).

    Args:
      model: an mwjax model.

    Returns:
      The paths ("model.layers.0.self_attn.q_proj", ...) in module order, `lm_head` included.
    """
    return [".".join(map(str, path)) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]


def fused_groups(model: nnx.Module, paths: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The HF fused modules that any of `paths` belongs to (the family record's `fused_modules`).

    Args:
      model: an mwjax model (its `config.model_type` names the family).
      paths: dotted module paths of projections.

    Returns:
      HF fused module path -> the paths of its projections in its output-row order, e.g.
      "model.layers.0.self_attn.qkv_proj" -> (...q_proj, ...k_proj, ...v_proj); {} for a family without fused
      HF modules.
    """
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
    """The module paths that get adapters; a ValueError names any pattern that matches nothing, and (under
    `config.fuse`) a fused HF module that the targets take only in part.

    Args:
      model: the base model.
      config: its `targets` (glob patterns; () for every linear layer but `lm_head`), `exclude_router`, `fuse`.

    Returns:
      The chosen dotted paths, in module order (never empty).
    """
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


def fused_paths(model: nnx.Module) -> dict[str, tuple[str, ...]]:
    """Every HF fused module of `model` (`fused_groups` over all linear layers).

    Args:
      model: an mwjax model.

    Returns:
      HF fused module path -> its projections' paths; {} for a family without fused HF modules.
    """
    return fused_groups(model, linear_paths(model))


def add_adapters(model: nnx.Module, config: LoraConfig, seed: int = 0) -> nnx.Module:
    """A copy of `model` whose target linear layers carry adapters (PEFT `get_peft_model`); the input is untouched.

    Args:
      model: the base model; one that already carries adapters is refused (ValueError).
      config: the adapters' hyper-parameters and targets (`select_targets`).
      seed: seeds the adapters' A initialisation (and the LoRA dropout stream, seed + 1).

    Returns:
      The copy, its targets replaced by `LoRALinear` (B = 0, so it computes what `model` does) and
      `lora_config` = `config`.
    """
    if any(isinstance(m, LoRALinear) for _, m in nnx.iter_modules(model)):
        raise ValueError("this model already carries adapters; merge() them first or start from the base model")
    targets = select_targets(model, config)
    out = nnx.clone(model)
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    # under fuse: projection path -> its fused module, whose first adapter made makes the shared A
    group_of = {m: hf for hf, members in fused_groups(model, targets).items() for m in members} if config.fuse else {}
    shared: dict[str, LoRAParam] = {}
    for path in targets:
        group = group_of.get(path)
        layer = LoRALinear(paths.get(out, path), config, rngs=rngs, lora_a=shared.get(group))
        if group is not None:
            shared.setdefault(group, layer.lora_a)
        paths.replace(out, path, layer)
    out.lora_config = config
    return out


def adapters(model: nnx.Module) -> dict[str, LoRALinear]:
    """The adapted layers of `model`.

    Args:
      model: an mwjax model, with or without adapters.

    Returns:
      Dotted module path -> its `LoRALinear`, in module order; {} when it has none.
    """
    return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def merge(model: nnx.Module) -> nnx.Module:
    """A copy with every adapter folded into its base weight (plain `Linear` layers again; PEFT
    `merge_and_unload`).

    Args:
      model: a model carrying adapters; it is not modified.

    Returns:
      The copy: each `LoRALinear` replaced by a `Linear` whose kernel is its `merged_kernel()`, `lora_config`
      removed.
    """
    out = nnx.clone(model)
    for path, layer in adapters(out).items():
        kernel = layer.merged_kernel()
        plain = nnx.eval_shape(lambda layer=layer, kernel=kernel: Linear(
            layer.in_features, layer.out_features, axes=layer.axes, use_bias=layer.bias is not None,
            dtype=layer.dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
        plain.kernel = param(kernel, layer.axes)
        plain.bias = layer.bias
        paths.replace(out, path, plain)
    if hasattr(out, "lora_config"):
        del out.lora_config
    return out
