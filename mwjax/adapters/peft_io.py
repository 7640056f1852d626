"""HF PEFT adapter directories (adapter_config.json + adapter_model.safetensors) written and read as PEFT's
`save_pretrained` / `PeftModel.from_pretrained` do, every value read checked."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax import families
from mwjax.adapters.errors import AdapterError, check_tensor
from mwjax.adapters.lora import LoraConfig, LoRALinear
from mwjax.adapters.targets import adapters, add_adapters, fused_groups, fused_paths, linear_paths
from mwjax.core import atomic

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # an HF PEFT adapter


def export_peft(model: nnx.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                gguf_file: str | None = None) -> Path:
    """Write an HF PEFT adapter directory as `PeftModel.save_pretrained` does: adapter_config.json,
    adapter_model.safetensors and a README.md model card, directory-atomic (`mwjax.core.atomic`: a kill leaves the
    previous adapter or this one; an existing directory is replaced only when it holds a PEFT adapter).

    target_modules are PEFT's short names ("q_proj", ...) when they select exactly the adapted modules, else the
    full module paths. Module paths are HF's. Adapters made with `LoraConfig(fuse=True)` are written as PEFT's
    adapter of each fused HF module (Phi-3: `self_attn.qkv_proj.lora_A.weight` [r, in], `lora_B.weight`
    [q+k+v, r] = the projections' B stacked in row order, DoRA's `lora_magnitude_vector` likewise). Separate
    adapters on projections HF fuses have no PEFT target and are refused (ValueError), as are transformers 5's
    stacked Mixtral experts.

    Args:
      model: an mwjax model carrying adapters (`add_adapters`, with its `lora_config`).
      directory: the adapter directory to write.
      base_model_name_or_path: what `AutoPeftModelForCausalLM.from_pretrained(directory)` loads the base from (a
        hub id or an HF directory); None records no base (the card says to load it yourself).
      gguf_file: the GGUF file of a GGUF base, which PEFT's config cannot name: the card says to pass
        `gguf_file=` to `from_pretrained`.

    Returns:
      The directory.
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
    fused = fused_paths(model) if model.lora_config.fuse else {}
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
        check_tensor(value, f"{weights}: module {module}'s {_PART_NAMES[p]}", 1 if p == "m" else 2)
        modules.setdefault(module, {})[p] = value
    if not modules:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    for module, parts in sorted(modules.items()):
        missing = [_PART_NAMES[p] for p in ("A", "B") if p not in parts]
        if missing:
            raise AdapterError(f"{weights}: module {module}'s adapter has no {' / '.join(missing)}: an adapter is "
                               "an A and a B; the file is incomplete")
    return modules


def load_peft(model: nnx.Module, directory: str | os.PathLike) -> nnx.Module:
    """`model` (a base model) with the HF PEFT LoRA/DoRA adapter in `directory` attached
    (`PeftModel.from_pretrained`); adapters written by `export_peft` or by HF PEFT itself.

    Nothing is trusted: the config's r / lora_alpha / lora_dropout must lie in their range, every tensor must
    be a floating-point, finite lora_A / lora_B (/ DoRA magnitude) of a module the base model has, with the
    config's rank and the module's shape; an AdapterError names the file and the module otherwise. An adapter
    of a fused HF module (Phi-3 `qkv_proj`, `gate_up_proj`) is split over mwjax's projections sharing one A
    (`LoraConfig(fuse=True)`, its LoRA dropout dropped with a warning).

    Args:
      model: the base model (no adapters); it is not modified.
      directory: an HF PEFT adapter directory (adapter_config.json + adapter_model.safetensors).

    Returns:
      A copy of `model` carrying the adapter (`LoRALinear` layers, `lora_config` set).
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
    fused = fused_paths(model)
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
