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
        """An empty cache: zeros for every layer, length 0.

        Args:
          config: the model's config (`num_hidden_layers`, `num_key_value_heads`, `head_dim`).
          batch: rows of the batch.
          max_len: positions the cache holds (`mwjax.eval.decoding`: the prompt plus the new tokens).
          dtype: dtype of the keys and values (decoding passes the model's compute dtype).

        Returns:
          A `KVCache` whose keys and values are [batch, max_len, kv_heads, head_dim] per layer.
        """
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(keys=zeros, values=zeros, length=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        """Positions the cache holds (the keys' second axis)."""
        return self.keys[0].shape[1]


@struct.dataclass
class LayerCache:
    """One layer's slice of a KVCache, handed to its attention."""

    keys: jax.Array
    values: jax.Array
    offset: jax.Array  # int32 []: where the new keys go

    def update(self, k: jax.Array, v: jax.Array) -> LayerCache:
        """This layer's cache with the new keys and values written from `offset` on (`offset` itself unchanged).

        Args:
          k: the new keys [batch, t, kv_heads, head_dim] (after RoPE), cast to the cache's dtype.
          v: the new values [batch, t, kv_heads, head_dim], cast likewise.

        Returns:
          A `LayerCache` holding them at positions offset .. offset + t - 1.
        """
        start = (0, self.offset, 0, 0)
        return LayerCache(keys=jax.lax.dynamic_update_slice(self.keys, k.astype(self.keys.dtype), start),
                          values=jax.lax.dynamic_update_slice(self.values, v.astype(self.values.dtype), start),
                          offset=self.offset)
