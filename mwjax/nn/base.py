"""The forward pass shared by every family (HF `*ForCausalLM.forward`).

A family supplies `model.embed_tokens`, `model.layers` (decoder layers with the signature
`layer(x, rope, mask, row_mask, taps, cache) -> (x, cache)`), `model.norm` and `lm_head`
(None when tied), and may override `embed`, `unembed` and `rope_tables`. Everything else —
positions, attention masks per layer type, FFN row masks, probes, activation edits and the KV
cache — is handled here once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.core import sharding
from mwjax.instrument import interventions, masks, probes
from mwjax.nn import attention, rope
from mwjax.nn.cache import KVCache, LayerCache
from mwjax.nn.config import SLIDING_ATTENTION, ModelConfig
from mwjax.nn.stack import LayerStack


@dataclasses.dataclass(frozen=True)
class Taps:
    """Per-forward instrumentation: probes to record and activation edits to apply.

    `taps(module, point, layer, x)` applies the edit registered for (point, layer), records the
    (edited) value if the probe config asks for it, and returns it. Blocks pass their static `layer_idx`;
    inside the stacked layers' scan (`mwjax.nn.stack`), whose template layer is layer 0, `layer` holds the
    traced index of the layer running and replaces it: edits switch on it, probes record at every layer (the
    scan keeps the wanted ones), and `touches` answers for all layers at once (a static choice of code path).
    """

    probes: probes.ProbeConfig | None = None
    edits: interventions.Edits | None = None
    positions: jax.Array | None = None  # int32 [b, t], for edits that treat the first token apart
    layer: jax.Array | None = None  # int32 []: the scanned layer's index (None outside a scan)

    def edit(self, point: str, layer: int, x: jax.Array) -> jax.Array:
        """Only the edit (for blocks that record a value assembled from several edited parts).

        Args:
          point: the activation's name (an `interventions.EDITABLE_POINTS` entry, e.g. "intermediate").
          layer: the block's static layer index (replaced by the traced `self.layer` inside a scan).
          x: the activation [b, t, d].

        Returns:
          `x` with the edit registered for (point, layer) applied; `x` itself when there is none.
        """
        return interventions.apply(self.edits, point, layer if self.layer is None else self.layer, x, self.positions)

    def record(self, module: nnx.Module, point: str, layer: int, x: jax.Array) -> None:
        """Only the probe: record `x` at (point, layer) if the probe config asks for it.

        Args:
          module: the module that sows the value (nnx intermediates).
          point: the probe point's name (a key of `probes.POINTS`).
          layer: the block's static layer index (None is recorded inside a scan, which keeps the wanted layers).
          x: the activation [b, t, d].
        """
        probes.sow(module, point, None if self.layer is not None else layer, x, self.probes)

    def touches(self, point: str, layer: int) -> bool:
        """Whether an edit or a probe acts at (point, layer) (in a scan: at `point` of any layer).

        Args:
          point: the activation's name.
          layer: the block's static layer index (ignored inside a scan).

        Returns:
          True when the block must compute and pass the value through `taps` (a static choice of code path).
        """
        if self.layer is not None:
            edited = any(edited_point == point for edited_point, _ in self.edits or {})
            return edited or (self.probes is not None and self.probes.wants(point, None))
        edited = bool(self.edits) and (point, layer) in self.edits
        return edited or (self.probes is not None and self.probes.wants(point, layer))

    def __call__(self, module: nnx.Module, point: str, layer: int, x: jax.Array) -> jax.Array:
        x = self.edit(point, layer, x)
        self.record(module, point, layer, x)
        return x


class Attached(nnx.Variable):
    """FFN row masks and activation edits that a copy of a model carries (set by `mwjax.research.attacks.attach`).

    Value: {"ffn_masks": {layer: RowMask}, "edits": {(point, layer): ActivationEdit}}. Not a
    parameter: optimisers, checkpoints and exports of parameters ignore it.
    """


OFFLOAD_MEMORY = "pinned_host"  # where remat="offload" keeps the saved matmul outputs
# rematerialisation of each decoder layer in the backward pass (training); None = keep activations
REMAT_POLICIES = {
    "full": None,  # recompute everything inside a layer
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
    "nothing": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs in the host's pinned memory, not the accelerator's: copied back for the backward pass
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", OFFLOAD_MEMORY),
}


class CausalLM(nnx.Module):
    """Base of the model classes: tokens [b, t] -> logits [b, t, vocab].

    `remat` (None or a REMAT_POLICIES name) rematerialises each decoder layer under autodiff.
    """

    config: ModelConfig
    attached: Attached | None = None
    remat: str | None = None

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings (HF `embed_tokens`); families override it (Gemma scales by sqrt(d_model)).

        Args:
          tokens: int32 [b, t] token ids.

        Returns:
          [b, t, d_model] in the compute dtype.
        """
        return self.model.embed_tokens(tokens)

    def unembed(self, x: jax.Array) -> jax.Array:
        """The LM head (HF `lm_head`; with tied embeddings, x @ embedding.T).

        Args:
          x: the final norm's output [b, t, d_model].

        Returns:
          Logits [b, t, vocab].
        """
        return self.model.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def rope_tables(self, positions: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
        """RoPE tables per layer type (`config.rope_for`: Gemma 3's sliding layers have their own).

        Args:
          positions: int32 [b, t] position ids.

        Returns:
          {layer type: (cos, sin)}, each float32 [b, t, rotary_dim] (`rope.rope_table`).
        """
        cfg = self.config
        return {kind: rope.rope_table(cfg.rope_for(kind), cfg.head_dim, positions)
                for kind in set(cfg.layer_types)}

    def attention_masks(self, t: int, kv_len: int, offset=0, padding_mask: jax.Array | None = None,
                        segment_ids: jax.Array | None = None) -> dict[str, attention.AttentionMask]:
        """The causal mask per layer type (sliding-window layers get theirs) for t queries over kv_len keys.

        Args:
          t: number of queries.
          kv_len: number of keys (t, or the KV cache's max_len).
          offset: absolute index of the first query (the cache's length); an int or an int32 [] array.
          padding_mask: [b, kv_len] (1 = real token) or [b, t, kv_len] (keys visible per query); None for none.
          segment_ids: [b, t] packed-sequence ids (training); None for none.

        Returns:
          {layer type: `attention.AttentionMask`} (`attention.layer_type_masks`).
        """
        cfg = self.config
        windows = {kind: cfg.sliding_window if kind == SLIDING_ATTENTION else None for kind in set(cfg.layer_types)}
        return attention.layer_type_masks(t, kv_len, windows, q_offset=offset, padding_mask=padding_mask,
                                          segment_ids=segment_ids)

    def __call__(self, tokens: jax.Array, *args, **kwargs) -> jax.Array | tuple[jax.Array, KVCache]:
        """Logits [b, t, vocab]; with a cache, (logits, the cache advanced by t positions). Arguments as
        `hidden_states` (positions, attention_mask, ffn_masks, probes, edits, cache, segment_ids)."""
        x, cache = self.hidden_states(tokens, *args, **kwargs)
        logits = self.unembed(x)
        return logits if cache is None else (logits, cache)

    def hidden_states(
        self,
        tokens: jax.Array,  # int32 [b, t]
        positions: jax.Array | None = None,  # int32 [b, t]; default offset + 0..t-1
        attention_mask: jax.Array | None = None,  # [b, t] (with a cache: [b, cache.max_len]); 1 = real token;
        # or [b, t, t] (with a cache: [b, t, cache.max_len]): 1 = key visible to that query (besides causality)
        ffn_masks: masks.FFNMasks | None = None,  # {layer: RowMask} on W_gate / W_up rows
        probes: probes.ProbeConfig | None = None,
        edits: interventions.Edits | None = None,  # {(point, layer): ActivationEdit}
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,  # [b, t]: packed sequences (training); attention stays within one
    ) -> tuple[jax.Array, KVCache | None]:
        """Everything of `__call__` but the unembedding (HF `*Model.forward`'s last hidden state), for losses
        that unembed in chunks (`mwjax.finetune.loss.chunked_token_loss`).

        Stacked layers (`mwjax.nn.stack`) run in one `jax.lax.scan`, probes and edits included; with a KV
        cache or FFN row masks on different Mixtral experts, one by one over slices of the stack (no probes).

        Args:
          tokens: int32 [b, t] token ids.
          positions: int32 [b, t] position ids; None for offset + 0..t-1 (offset: the cache's length).
          attention_mask: [b, t] (with a cache: [b, cache.max_len]), 1 = real token; or [b, t, t] (with a cache:
            [b, t, cache.max_len]), 1 = key visible to that query (besides causality); None for none.
          ffn_masks: {layer: RowMask} on the rows of W_gate / W_up, joined with the attached ones.
          probes: the `ProbeConfig` of what to record (nnx intermediates); None records nothing.
          edits: {(point, layer): ActivationEdit} applied to activations (e.g. massive activations set to 0).
          cache: a `KVCache` to decode with; None for a plain forward.
          segment_ids: [b, t] ids of packed sequences (training): attention stays within one.

        Returns:
          (the final norm's output [b, t, d_model], the cache advanced by t positions, or None without one).
        """
        cfg = self.config
        b, t = tokens.shape
        ffn_masks, edits = self.with_attached(ffn_masks, edits)
        self.validate_masks(ffn_masks)
        interventions.validate(edits, cfg.num_hidden_layers)
        offset = 0 if cache is None else cache.length
        kv_len = t if cache is None else cache.max_len
        if attention_mask is not None and attention_mask.shape not in ((b, kv_len), (b, t, kv_len)):
            keys = "cache.max_len" if cache else "seq"
            raise ValueError(f"attention_mask must have shape [batch, {keys}] = {[b, kv_len]} (padding) or "
                             f"[batch, seq, {keys}] = {[b, t, kv_len]} (keys per query), got "
                             f"{list(attention_mask.shape)}")
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        ropes = self.rope_tables(positions)
        attn_masks = self.attention_masks(t, kv_len, offset, attention_mask, segment_ids)
        taps = Taps(probes, edits, positions if edits else None)
        if probes is not None and self.remat is not None:
            raise ValueError("probes and remat do not combine (probes record inside the layers that remat "
                             "recomputes); set model.remat = None to probe")
        x = sharding.constrain(self.embed(tokens), sharding.HIDDEN_AXES)
        layers = self.model.layers
        if isinstance(layers, LayerStack):
            if cache is None and layers.scannable(ffn_masks):
                x = layers.scan(x, ropes, attn_masks, cfg.layer_types, ffn_masks, taps, self.remat_policy(),
                                remat=self.remat is not None)
                return self.model.norm(x), None
            if probes is not None:
                raise ValueError("a stacked model (mwjax.nn.stack) records probes in its scan, which takes "
                                 "no KV cache and FFN row masks on one Mixtral expert only: probe "
                                 "mwjax.nn.stack.unstack_layers(model) for these")
            layers = layers.layers()  # one layer at a time over slices of the stack (KV cache, experts' masks)
        new_keys, new_values = [], []
        for i, layer in enumerate(layers):
            kind = cfg.layer_types[i]
            layer_cache = None if cache is None else LayerCache(cache.keys[i], cache.values[i], offset)
            with jax.named_scope(f"layer_{i}"):
                x, layer_cache = self.run_layer(layer, x, ropes[kind], attn_masks[kind], ffn_masks.get(i), taps,
                                                layer_cache)
                x = sharding.constrain(x, sharding.HIDDEN_AXES)
            if layer_cache is not None:
                new_keys.append(layer_cache.keys)
                new_values.append(layer_cache.values)
        x = self.model.norm(x)
        if cache is None:
            return x, None
        return x, KVCache(keys=tuple(new_keys), values=tuple(new_values), length=offset + t)

    def run_layer(self, layer, x, rope, mask, row_mask, taps: Taps, cache):
        """One decoder layer, rematerialised under autodiff when `self.remat` says so.

        Args:
          layer: the decoder layer (`layer(x, rope, mask, row_mask, taps, cache) -> (x, cache)`).
          x: the residual stream [b, t, d_model].
          rope: (cos, sin) of the layer's type (`rope_tables`).
          mask: the `attention.AttentionMask` of the layer's type.
          row_mask: the layer's FFN `RowMask`, or None.
          taps: the forward's probes and edits.
          cache: the layer's `LayerCache`, or None.

        Returns:
          (x [b, t, d_model] after the layer, the updated LayerCache or None).
        """
        if self.remat is None:
            return layer(x, rope, mask, row_mask, taps, cache)
        policy = self.remat_policy()
        graphdef, state = nnx.split(layer)

        def pure(state, x, rope, mask, row_mask, cache):  # jax.checkpoint wants a function of arrays
            return nnx.merge(graphdef, state)(x, rope, mask, row_mask, taps, cache)

        return jax.checkpoint(pure, policy=policy)(state, x, rope, mask, row_mask, cache)

    def remat_policy(self):
        """The `jax.checkpoint` policy of `self.remat` (None: recompute everything, or no remat at all)."""
        if self.remat is not None and self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; choose from {sorted(REMAT_POLICIES)} or None")
        if self.remat == "offload":
            device = jax.devices()[0]
            kinds = {memory.kind for memory in device.addressable_memories()}
            if OFFLOAD_MEMORY not in kinds:
                raise ValueError(f"remat='offload' keeps matmul outputs in {OFFLOAD_MEMORY!r} memory, which "
                                 f"{device.platform} devices lack (they have {sorted(kinds)}): choose 'dots' or 'full'")
        return REMAT_POLICIES.get(self.remat)

    def with_attached(self, ffn_masks, edits) -> tuple[masks.FFNMasks, interventions.Edits | None]:
        """Call-time masks and edits joined with the attached ones (a clash is an error, not an override).

        Args:
          ffn_masks: {layer: RowMask} given at call time, or None.
          edits: {(point, layer): ActivationEdit} given at call time, or None.

        Returns:
          (ffn_masks as a dict, possibly empty; edits, or None when there are none).
        """
        ffn_masks = dict(ffn_masks or {})
        if self.attached is None:
            return ffn_masks, edits
        attached = self.attached.get_value()
        for name, extra, own in (("ffn_masks", ffn_masks, attached["ffn_masks"]),
                                 ("edits", edits or {}, attached["edits"])):
            if clash := sorted(set(extra) & set(own)):
                raise ValueError(f"{name} for {clash} are already attached to this model (by mwjax.attacks); "
                                 "apply one or the other")
        return ffn_masks | attached["ffn_masks"], {**(edits or {}), **attached["edits"]} or None

    def validate_masks(self, ffn_masks: masks.FFNMasks) -> None:
        """Check FFN row masks against the config (`masks.validate`: layers, [k, d_model] values, rows in d_ff).

        Args:
          ffn_masks: {layer: RowMask}; a ValueError names the first bad one.
        """
        cfg = self.config
        masks.validate(ffn_masks, num_layers=cfg.num_hidden_layers, d_ff=cfg.intermediate_size,
                       d_model=cfg.hidden_size)
