"""Functions of a model compiled once per model structure: split, jit, merge.

    @jit_model(static_argnums=0)
    def _capture(model, config, tokens): ...
    _capture(model, config, tokens)          # == _capture.on_state(*nnx.split(model), config, tokens)

`nnx.split` separates a module into its graphdef (structure, hashable) and its state (arrays).
The compiled function takes the graphdef as a static argument and the state as traced arrays, so
models of one structure with different weights (an attacked copy, a merged adapter, a checkpoint
of another step) share one compiled program, as do masks and edits passed as traced arguments.
It differs from `nnx.jit` in not writing state changes back to the module: these functions read
the model, they do not update it (training keeps its own split in `mwjax.finetune.train`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def jit_model(fn: Callable[..., Any] | None = None, *, static_argnums: int | tuple[int, ...] = ()):
    """Compile `fn(model, *args)` with the model's graphdef static and its state traced.

    Usable as `@jit_model` or `@jit_model(static_argnums=...)`.

    Args:
      fn: the function of an nnx model and further arguments; None when used as `@jit_model(...)`.
      static_argnums: indices into `args` (the arguments after the model) that are static too (hashable
        Python values: configs, lengths, sampling settings); every other argument is traced.

    Returns:
      `call(model, *args)`; `call.on_state(graphdef, state, *args)` is the compiled function itself, for
      callers that split a model once and run it many times, and `call._cache_size()` counts its compiled
      programs. With `fn` None, the decorator that makes it.
    """
    if fn is None:
        return functools.partial(jit_model, static_argnums=static_argnums)
    extra = (static_argnums,) if isinstance(static_argnums, int) else tuple(static_argnums)

    # graphdef and state come first: static argument i of fn's args is argument i + 2 here
    @functools.partial(jax.jit, static_argnums=(0, *(i + 2 for i in extra)))
    def on_state(graphdef, state, *args):
        return fn(nnx.merge(graphdef, state), *args)

    @functools.wraps(fn)
    def call(model: nnx.Module, *args):
        graphdef, state = nnx.split(model)
        return on_state(graphdef, state, *args)

    call.on_state = on_state
    call._cache_size = on_state._cache_size
    return call


def keep_compiled_programs(directory: str | None) -> str | None:
    """Turn on jax's persistent compilation cache in `directory`, unless a cache directory is set already.

    A relaunched run (after a preemption, or the next seed of one config) then loads its compiled training step
    instead of compiling it again, minutes at 8B-70B. Only programs that took over a second to compile are kept
    (jax's default). Call it before the first compilation: jax reads the directory once.

    Args:
      directory: a local path or gs://...; None or "": leave jax as it is. Ignored when a cache directory is
        set already (`JAX_COMPILATION_CACHE_DIR`, or by the caller).

    Returns:
      The directory in use (None: no cache, e.g. turned off by `mwjax.core.distributed.initialize`).
    """
    if not jax.config.jax_enable_compilation_cache:
        return None
    if jax.config.jax_compilation_cache_dir or not directory:
        return jax.config.jax_compilation_cache_dir or None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return str(directory)
