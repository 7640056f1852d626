"""`load(path)`: any supported checkpoint -> (mwjax model, HF tokenizer).

The model is first built abstractly (shapes only), then every parameter is read from the
checkpoint by its HF key, transformed by the family's key table, checked against the shape the
config implies, cast, and placed on its device (or sharding): one tensor in host memory at a time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mwjax import families
from mwjax.converters import checkpoint, embedded, gguf_file, gguf_source, tokens
from mwjax.converters.errors import CheckpointError, InvalidConfigError, ShapeMismatchError, UnsupportedCheckpointError
from mwjax.converters.gguf_source import GGUFSource
from mwjax.converters.sources import FLOAT_DTYPES, SafetensorsSource, TensorSource, TorchBinSource
from mwjax.core import atomic
from mwjax.core.paths import dotted
from mwjax.core.progress import progress as progress_display
from mwjax.core.sharding import ShardingFn, declared_axes
from mwjax.families.hf_config import read_hf_config
from mwjax.nn.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

TOKENIZER_DIR = "tokenizer"  # beside an orbax checkpoint written by converters.to_orbax
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def load(path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None, shardings: ShardingFn | None = None,
         tokenizer: bool | str | os.PathLike = True, revision: str | None = None, allow_unused: bool = False):
    """Load a checkpoint as `(model, tokenizer)`: HF `AutoModelForCausalLM` + `AutoTokenizer.from_pretrained`.

    The tokenizer is built and checked against the config's vocabulary before any weight is read.

    Args:
      path: a HF directory (`config.json` + `*.safetensors`, single or sharded, or `pytorch_model*.bin`),
        a `.gguf` file (or a directory holding exactly one), an mwjax orbax checkpoint, `embedded:<name>` (see
        `converters.embedded`), or a hub id (`owner/name`, downloaded with huggingface_hub when online).
      dtype: compute dtype.
      param_dtype: dtype the parameters are stored in; None for `dtype`.
      shardings: optional `(param_path, shape, declared logical axes) -> Sharding`; each array is assembled on
        its devices from the slices they need.
      tokenizer: True: the checkpoint's own tokenizer (an error naming the file and the cause when it
        has none or it cannot be built); False: the model alone (tokenizer None); a path: the tokenizer
        of that HF directory or `.gguf` file instead.
      revision: the hub revision (branch, tag or commit) when `path` is a hub id; None for the default branch.
      allow_unused: load even when the checkpoint holds tensors the model does not use (else an error).

    Returns:
      `(model, tokenizer)`: the mwjax model of the checkpoint's family and an HF tokenizer (or None).
    """
    build = functools.partial(build_from_source, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                              allow_unused=allow_unused)
    # The tokenizer is built before any weight is read: a broken one fails in seconds, not after the model.
    other = tokenizer is not True and tokenizer is not False
    tok = load_tokenizer(tokenizer) if other else None
    own = bool(tokenizer) and not other  # the checkpoint's own tokenizer
    named = os.fspath(tokenizer) if other else None
    path = resolve(path, revision)
    if path.is_dir() and not (path / "config.json").exists() and not checkpoint.is_checkpoint(path):
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise UnsupportedCheckpointError(f"{path} has no config.json: it is not a HF checkpoint directory")
        path = ggufs[0]
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        config = _model_config(source.hf_config, path)
        tok = _gguf_tokenizer(source.file) if own else tok
        check_vocabulary(tok, config, model=path, tokenizer_name=named)
        return build(config, source), tok
    if not path.is_dir():
        raise UnsupportedCheckpointError(
            f"{path} is neither a .gguf file nor a checkpoint directory (HF: config.json + weights; mwjax orbax)"
        )
    if checkpoint.is_checkpoint(path):
        tok = _hf_tokenizer(path / TOKENIZER_DIR, checkpoint=path) if own else tok
        if tok is not None:
            config = _model_config(lambda: checkpoint.read_metadata(path)["config"], path, hf=False)
            check_vocabulary(tok, config, model=path, tokenizer_name=named)
        return checkpoint.restore(path, dtype=dtype, param_dtype=param_dtype, shardings=shardings), tok
    config_file = path / "config.json"
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    config = _model_config(lambda: hf_config, config_file)
    if any(path.glob("*.safetensors")):
        source: TensorSource = SafetensorsSource(path)
    elif any(path.glob("pytorch_model*.bin")):
        source = TorchBinSource(path)
    else:
        raise CheckpointError(f"{path} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    tok = _hf_tokenizer(path, checkpoint=path) if own else tok
    check_vocabulary(tok, config, model=path, tokenizer_name=named)
    return build(config, source), tok


def check_vocabulary(tokenizer, config: ModelConfig, *, model: str | os.PathLike,
                     tokenizer_name: str | None = None) -> None:
    """Every id `tokenizer` can emit must index the model's embedding (`tokens.check_vocabulary`).

    Args:
      tokenizer: an HF tokenizer; None checks nothing.
      config: the model's config (its `vocab_size` is the embedding's row count).
      model: the checkpoint, named in the CheckpointError raised otherwise.
      tokenizer_name: where the tokenizer came from, for the error; None for the checkpoint's own.
    """
    if tokenizer is None:
        return
    try:
        tokens.check_vocabulary(tokenizer, config.vocab_size, model=str(model),
                                tokenizer_name=tokenizer_name or f"{model}'s own tokenizer")
    except tokens.VocabularyError as e:
        raise CheckpointError(str(e)) from e


def _model_config(read_config, where: Path, hf: bool = True) -> ModelConfig:
    """The ModelConfig of a checkpoint (`read_config()`: an HF config dict, or mwjax's own when not `hf`), every
    error naming the file it came from."""
    try:
        config = read_config()
        if not isinstance(config, dict):
            raise ConfigError(f"the configuration must be a JSON object, not {type(config).__name__}")
        return read_hf_config(config) if hf else ModelConfig.from_dict(config)
    except CheckpointError:
        raise
    except ConfigError as e:
        raise InvalidConfigError(f"{where}: {e}") from e


def build_from_source(config: ModelConfig, source: TensorSource, *, dtype=jnp.float32, param_dtype=None,
                      shardings: ShardingFn | None = None, progress: bool = True,
                      allow_unused: bool = False) -> nnx.Module:
    """Fill an abstract model from `source` through the family's key table.

    A parameter comes from the first of its table's locations whose tensor the source has; a
    tensor that holds several parameters (fused or stacked) is read once for all of them.
    Nothing is trusted: before any weight is read, every parameter's tensor must exist with the
    shape the config implies and every checkpoint tensor must be used; then each tensor must be floating
    point and finite.

    Args:
      config: the model's config; its `model_type` picks the family and key table.
      source: the checkpoint's tensors by HF key (safetensors, torch .bin or GGUF).
      dtype: compute dtype.
      param_dtype: dtype the parameters are stored in; None for `dtype`.
      shardings: `(param_path, shape, declared logical axes) -> Sharding` for each array; None: default device.
      progress: show a progress bar over the parameters.
      allow_unused: let checkpoint tensors the model does not use pass with a warning (else CheckpointError).

    Returns:
      The filled mwjax model.
    """
    keymap = families.family(config.model_type).keymap
    graphdef, state = nnx.split(families.abstract(config, dtype=dtype, param_dtype=param_dtype))
    abstract, axes = nnx.to_pure_dict(state), declared_axes(state)
    shapes = {dotted(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    locations = {name: _locate(source, name, candidates) for name, candidates in keymap.plan(shapes).items()}
    unused = [k for k in source.unused({loc.hf_key for loc in locations.values()}) if not keymap.ignored(k)]
    if unused and not allow_unused:
        raise CheckpointError(
            f"{source.name}: {len(unused)} checkpoint tensors are not used by the {config.model_type} model its "
            f"config describes ({config.num_hidden_layers} layers): {unused[:8]}; the config does not match the "
            "weights, or pass allow_unused=True to load anyway")
    if unused:
        log.warning("%s: %d checkpoint tensors were not used: %s", source.name, len(unused), unused[:10])
    _check_tied_embeddings(config, source)
    read = functools.lru_cache(maxsize=4)(source.get)  # the fused / stacked tensors being split
    bar = progress_display(len(shapes), f"loading {Path(source.name).name}", enabled=progress)

    def fill(key_path, leaf: jax.ShapeDtypeStruct):
        name = dotted(key_path)
        location = locations[name]
        raw = read(location.hf_key)
        if raw.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{source.name}: tensor {location.hf_key!r} is stored as {raw.dtype}, not a "
                                  f"floating-point type (mwjax parameter {name}); the checkpoint is corrupt")
        array = location.to_nnx(raw)
        if not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise CheckpointError(f"{source.name}: tensor {location.hf_key!r} holds {bad} NaN / inf values (mwjax "
                                  f"parameter {name}); the checkpoint is corrupt")
        bar.update()
        return _place(array, leaf.dtype, shardings(name, leaf.shape, axes.get(name)) if shardings else None)

    with bar:
        values = jax.tree_util.tree_map_with_path(fill, abstract)
    read.cache_clear()
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


def _check_tied_embeddings(config: ModelConfig, source: TensorSource) -> None:
    """A config that ties the output projection to the embedding, over a checkpoint whose own
    `lm_head.weight` differs from it, contradicts itself (HF writes the tied copy as an equal tensor)."""
    if not config.tie_word_embeddings or "lm_head.weight" not in source or "model.embed_tokens.weight" not in source:
        return
    if not np.array_equal(source.get("lm_head.weight"), source.get("model.embed_tokens.weight")):
        raise CheckpointError(
            f"{source.name}: the config says tie_word_embeddings=True but the checkpoint's lm_head.weight differs "
            "from model.embed_tokens.weight; the config does not match the weights")


def _locate(source: TensorSource, name: str, candidates):
    """The first of a parameter's table locations that the source holds, with the shape the config implies."""
    location = next((c for c in candidates if c.hf_key in source), None)
    if location is None:
        raise source.missing(candidates[0].hf_key, name, also=[c.hf_key for c in candidates[1:]])
    shape = tuple(source.shape(location.hf_key))
    if shape != location.hf_shape:
        raise ShapeMismatchError(
            f"{source.name}: tensor {location.hf_key!r} has shape {list(shape)} but the config implies "
            f"{list(location.hf_shape)} (mwjax parameter {name}); the config.json does not match the weights")
    return location


def _place(array: np.ndarray, dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    if sharding is None:
        return jnp.asarray(np.asarray(array, dtype=dtype))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: np.asarray(array[index], dtype=dtype))


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a HF directory, a `.gguf` file or `embedded:<name>` (no weights read).

    Args:
      path: a HF directory (or mwjax `tokenizer/` directory), a `.gguf` file, `embedded:<name>` or a hub id.

    Returns:
      The HF tokenizer (`AutoTokenizer`, or the fast tokenizer built from the GGUF metadata).
    """
    path = resolve(path, None)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(gguf_file.read(path))
    return _hf_tokenizer(path, checkpoint=path)


def _gguf_tokenizer(file: gguf_file.GGUFFile):
    path = file.path
    try:
        return gguf_source.read_tokenizer(file)
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers / transformers raise many kinds on metadata they cannot use
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF metadata ({type(e).__name__}: "
                              f"{e}); load the model alone with tokenizer=False, or pass tokenizer=PATH") from e


def _hf_tokenizer(directory: Path, checkpoint: Path):
    if not any((directory / f).exists() for f in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{checkpoint} carries no tokenizer ({directory} has none of {', '.join(_TOKENIZER_FILES)}); load the "
            "model alone with tokenizer=False, or pass tokenizer=PATH (a HF directory or .gguf file)")
    from transformers import AutoTokenizer

    try:
        # never the checkpoint's own Python code (tokenizer_config.json's auto_map): refused, not asked on a terminal
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds on damaged tokenizer files
        if "trust_remote_code" in str(e):
            raise CheckpointError(
                f"{directory}: its tokenizer is the checkpoint's own Python code (auto_map in tokenizer_config.json), "
                "which mwjax never runs (trust_remote_code=False); pass tokenizer=PATH (--tokenizer) to use a "
                "tokenizer without code, or tokenizer=False to load the model alone") from e
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({type(e).__name__}: {e}); load the model "
                              "alone with tokenizer=False, or pass tokenizer=PATH") from e


def resolve(path: str | os.PathLike, revision: str | None = None) -> Path:
    """Local path, `embedded:<name>`, or hub id (downloaded) -> a local path; FileNotFoundError if none.

    A local path killed mid-swap by an atomic export is repaired first (`atomic.recover`).

    Args:
      path: a local file or directory, `embedded:<name>`, or a hub id `owner/name`.
      revision: the hub revision to download; None for the default branch.

    Returns:
      The local path.
    """
    text = os.fspath(path)
    if text.startswith(embedded.PREFIX):
        return embedded.path(text[len(embedded.PREFIX):])
    local = Path(text).expanduser()
    atomic.recover(local)  # an export killed between the two renames of its swap (mwjax.core.atomic) is repaired
    if local.exists():
        return local
    if _HUB_ID.match(text):
        return _download(text, revision)
    raise FileNotFoundError(f"{text}: no such file or directory (nor an embedded:<name> model or a hub id owner/name)")


def peft_base(path: str | os.PathLike) -> tuple[str, str | None]:
    """How HF transformers / PEFT load the base model `path` names.

    Args:
      path: a hub id, a local HF directory, a .gguf file or `embedded:<name>`.

    Returns:
      `(base_model_name_or_path, gguf_file)`: a hub id as it is, a local HF directory as its absolute path (gguf_file
      None), a .gguf file (or `embedded:<name>`) as its directory and file name (`from_pretrained(directory,
      gguf_file=name)`).
    """
    text = os.fspath(path)
    if not text.startswith(embedded.PREFIX) and not Path(text).expanduser().exists() and _HUB_ID.match(text):
        return text, None
    local = resolve(text).absolute()
    if local.suffix == ".gguf":
        return str(local.parent), local.name
    return str(local), None


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin*"
        patterns = ["*.json", weights, "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, gated, unknown repo: huggingface_hub raises several kinds
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "On a machine without the hub, pass a local directory or .gguf file instead."
        ) from e
