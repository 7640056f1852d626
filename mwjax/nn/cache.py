"""Key/value cache for incremental decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from mwjax.nn.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values [batch, max_len, kv_heads, head_dim] and how many positions are filled.

    All rows of a batch advance together; left padding is expressed through the attention mask
    ([batch, max_len], 1 = real token) that the caller passes with every step.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array  # int32 []

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=zeros, length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]


@struct.dataclass
class LayerCache:
    """One layer's slice of a KVCache, handed to its attention."""

    keys: jax.Array
    values: jax.Array
    offset: jax.Array  # int32 []: where the new keys go

    def update(self, k: jax.Array, v: jax.Array) -> LayerCache:
        start = (0, self.offset, 0, 0)
        return LayerCache(keys=jax.lax.dynamic_update_slice(self.keys, k.astype(self.keys.dtype), start),
                          values=jax.lax.dynamic_update_slice(self.values, v.astype(self.values.dtype), start),
                          offset=self.offset)
