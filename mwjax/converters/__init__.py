"""Foreign checkpoint formats <-> mwjax.

    from mwjax.converters import load, save_hf
    model, tokenizer = load("path/to/hf_dir" | "model.gguf" | "embedded:smollm2" | "embedded:gemma3-270m"
                            | "owner/name")
    save_hf(model, "out_dir", tokenizer=tokenizer)
"""

import logging

from mwjax.converters.errors import (
    CheckpointError,
    InvalidConfigError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedCheckpointError,
)
from mwjax.core import lazy

# the loader and the exporter (and with them jax, transformers) load on first use: flags and --help need neither
__getattr__, __dir__ = lazy.exports(__name__, {
    "build_from_source": "loader", "load": "loader", "load_tokenizer": "loader", "peft_base": "loader",
    "resolve": "loader", "save_hf": "hf_export"})


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    """transformers announces at import that without PyTorch its models are unavailable: mwjax reads checkpoints
    and tokenizers without torch by design, so the notice would only alarm (its other messages pass)."""
    return not str(record.msg).startswith("PyTorch was not found")


logging.getLogger("transformers").addFilter(_not_the_torch_notice)

__all__ = [
    "CheckpointError",
    "InvalidConfigError",
    "MissingTensorError",
    "ShapeMismatchError",
    "UnsupportedCheckpointError",
    "build_from_source",
    "load",
    "load_tokenizer",
    "peft_base",
    "resolve",
    "save_hf",
]
