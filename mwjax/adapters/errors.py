"""What an adapter that cannot be loaded raises, and the check every stored adapter tensor passes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


class AdapterError(ValueError):
    """An adapter that cannot be loaded onto this base model as it is: the message names the adapter's file (or
    directory) and the module."""


def check_tensor(value, what: str, ndim: int) -> None:
    """Check one stored adapter tensor: floating point, `ndim` dimensions, every value finite.

    Args:
      value: the tensor as read (numpy or jax array).
      what: where it comes from, the start of the error message ("<file>: module <path>'s lora_A.weight").
      ndim: the rank it must have (2 for lora_A / lora_B, 1 for DoRA's magnitude).

    Raises:
      AdapterError: starting with `what`, when any check fails.
    """
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise AdapterError(f"{what} is stored as {value.dtype}, not a floating-point type; the adapter is corrupt")
    if value.ndim != ndim:
        raise AdapterError(f"{what} has shape {tuple(value.shape)}, not {ndim}-D; the adapter is corrupt")
    finite = np.isfinite(np.asarray(value, np.float32))
    if not finite.all():
        raise AdapterError(f"{what} holds {int(finite.size - finite.sum())} NaN / inf values; the adapter is corrupt "
                           "(a diverged training run?)")
