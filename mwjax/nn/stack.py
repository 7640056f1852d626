"""Decoder layers stacked for `jax.lax.scan`: one layer module whose every array has a leading [L] axis.

A scan compiles one layer body however deep the model is, and its rematerialisation recomputes one layer at a
time in the backward pass. An unrolled loop of `jax.checkpoint`ed layers (the layout the converters, probes and
exports use: `model.model.layers[i]`) lets XLA schedule every recomputation early and keep all of them
alive, and its compile time grows with depth (`benchmarks/compile_memory.py`). `mwjax.finetune.train.Trainer` trains a
stacked copy (`TrainConfig.scan_layers`) and gives the unrolled layout back.

    stacked = stack_layers(model)      # model.model.layers: a LayerStack; same logits
    model = unstack_layers(stacked)    # model.model.layers[i] again, the same arrays sliced

FFN row masks, activation edits and probes keep addressing one layer inside the scan, which runs the layer
index alongside the stacked state (`mwjax.nn.base.Taps.layer`): row masks are stacked per layer
(`stacked_row_masks`), an edit applies where the index is its layer (`mwjax.instrument.interventions.apply`), and probes
come out of the scan stacked over the layers they want (`LayerStack.scan`), regrouped per layer by
`mwjax.instrument.probes.collect` as for the unrolled model. Probing every layer's full tensors holds them twice for a
moment (the stacked buffers `probes.capture` gets back, and the per-layer slices `collect` makes of them); a
`layers` subset or top-k / median statistics keep that small.

KV caches and FFN row masks on different Mixtral experts address one layer at a time: a stacked model runs
those forwards layer by layer over slices of the stack (its dropout streams stay where they were; probes are
refused there: probe the unstacked model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mwjax.core import sharding
from mwjax.instrument import masks, probes

LAYERS_AXIS = "layers"  # the logical axis of the stacked dimension (`mwjax.core.sharding.LOGICAL_RULES`: never split)


def _stack(*values):
    if isinstance(values[0], jax.ShapeDtypeStruct):  # an abstract model (nnx.eval_shape): shapes only
        return jax.ShapeDtypeStruct((len(values), *values[0].shape), values[0].dtype)
    return jnp.stack(values)


def _indexed(layer: nnx.Module, index: int) -> nnx.Module:
    """`layer` (new Variables over the same arrays) with `layer_idx` = index in it and its blocks."""
    layer = nnx.clone(layer)
    layer.set_attributes(layer_idx=index)
    return layer


class LayerStack(nnx.Module):
    """HF `model.layers` (L decoder layers of one structure) as `layer`, whose arrays are stacked [L, ...].

    Stacked parameters declare the logical axes (LAYERS_AXIS, *the layer's axes*). Each layer keeps its own
    random stream (LoRA dropout), advanced by the scan.
    """

    def __init__(self, layers: Sequence[nnx.Module]):
        template, *rest = [_indexed(layer, 0) for layer in layers]
        graphdef = nnx.graphdef(template)
        for i, layer in enumerate(rest, 1):
            if nnx.graphdef(layer) != graphdef:
                raise ValueError(f"decoder layer {i} differs in structure from layer 0 (modules, adapters or "
                                 "dtypes): such a model cannot be stacked; train it with scan_layers=False")
        flats = [nnx.to_flat_state(nnx.state(layer)) for layer in (template, *rest)]
        for entries in zip(*flats, strict=True):
            variable = entries[0][1]
            variable.set_value(_stack(*(v.get_value() for _, v in entries)))
            if (axes := variable.get_metadata().get(sharding.AXES)) is not None:
                variable.set_metadata(**{sharding.AXES: (LAYERS_AXIS, *axes)})
        self.layer = template
        self.num_layers = len(layers)

    def layers(self) -> list[nnx.Module]:
        """The unrolled layers: new modules over slices of the stack, each with its own `layer_idx` and axes."""
        graphdef, state = nnx.split(self.layer)
        out = []
        for i in range(self.num_layers):
            layer = _indexed(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)), i)
            for _, variable in nnx.to_flat_state(nnx.state(layer)):
                if (axes := variable.get_metadata().get(sharding.AXES)) is not None:
                    variable.set_metadata(**{sharding.AXES: axes[1:]})
            out.append(layer)
        return out

    def scannable(self, ffn_masks: masks.FFNMasks) -> bool:
        """Whether one scan can apply these row masks (Mixtral: all on the same expert, which is static).

        Args:
          ffn_masks: {layer: RowMask} on W_gate / W_up rows.

        Returns:
          True when the masks name at most one expert (None, for a dense model, counts as one).
        """
        return len({mask.expert for mask in ffn_masks.values()}) <= 1

    def scan(self, x: jax.Array, rope: Mapping, mask: Mapping, layer_types: Sequence[str],
             ffn_masks: masks.FFNMasks, taps, remat_policy=None, remat: bool = False) -> jax.Array:
        """x through every decoder layer by `jax.lax.scan` (the unrolled loop of `CausalLM.hidden_states`).

        Probes: each layer's records are written into slot `slot_of_layer[i]` of buffers carried by the scan,
        one slot per wanted layer plus a scratch slot that the other layers overwrite (a `layers` subset keeps
        no full tensor of the layers not asked for), then sown as `probes.LayerStacked` into this module.
        The layers' random streams (LoRA dropout) come back advanced.

        Args:
          x: the embedded tokens [b, t, d_model].
          rope: {layer type: (cos, sin)} (`CausalLM.rope_tables`).
          mask: {layer type: `attention.AttentionMask`} (`CausalLM.attention_masks`).
          layer_types: each layer's type, [L] (`config.layer_types`).
          ffn_masks: {layer: RowMask} on W_gate / W_up rows, on one expert at most (`scannable`).
          taps: `mwjax.nn.base.Taps` (edits, probes), given the scanned layer's index.
          remat_policy: the `jax.checkpoint` policy used when `remat` (None: recompute everything).
          remat: rematerialise each layer in the backward pass.

        Returns:
          The last layer's output [b, t, d_model] (before the final norm).
        """
        kinds = sorted(set(layer_types))
        kind_of_layer = jnp.asarray([kinds.index(kind) for kind in layer_types], jnp.int32)  # [L]
        ropes = jax.tree.map(lambda *a: jnp.stack(a), *(rope[kind] for kind in kinds))  # ([K, b, t, hd],) * 2
        attn_masks = jax.tree.map(lambda *a: jnp.stack(a), *(mask[kind] for kind in kinds))  # AttentionMask of [K, ...]
        # an enclosing nnx.capture (probes.capture) put empty capture slots in every module: the template layer's
        # are dropped (it never sows, its records leave the scan; and beside an nnx.List's integer keys they
        # could not be sorted into a State)
        for _, module in nnx.iter_modules(self.layer):
            if hasattr(module, "__captures__"):
                delattr(module, "__captures__")
        graphdef, state = nnx.split(self.layer)
        recorded = () if taps.probes is None else taps.probes.layers_of(self.num_layers)
        if not recorded:
            taps = dataclasses.replace(taps, probes=None)
        scratch = len(recorded)  # the slot of layers not recorded (used only when some are not)
        slot_of_layer = jnp.asarray([recorded.index(i) if i in recorded else scratch
                                     for i in range(self.num_layers)], jnp.int32)  # [L]

        def layer_step(layer_state, x, kind, row_mask, index):
            """One layer: (x, its dropout streams advanced, {point: {stat: value}} recorded by its probes)."""
            layer = nnx.merge(graphdef, layer_state)
            of_kind = lambda tree: jax.tree.map(lambda a: a[kind], tree)
            args = (x, of_kind(ropes), of_kind(attn_masks), row_mask, dataclasses.replace(taps, layer=index), None)
            records = {}
            if taps.probes is None:
                x, _ = layer(*args)
            else:
                (x, _), *states = nnx.capture(layer, *taps.probes.types)(*args)
                for path, sown in (entry for state in states for entry in nnx.to_flat_state(state)):
                    if path[-1] in records:  # each point is sown by one module of a layer, once
                        raise ValueError(f"probe point {path[-1]!r} is sown twice in one decoder layer")
                    records[path[-1]] = sown.get_value()[0]
            return x, nnx.state(layer, nnx.RngState), records

        def body(carry, per_layer):
            x, buffers = carry
            layer_state, kind, row_mask, index = per_layer
            x, rng_state, records = layer_step(layer_state, x, kind, row_mask, index)
            x = sharding.constrain(x, sharding.HIDDEN_AXES)  # as between unrolled layers (`CausalLM`)
            slot = slot_of_layer[index]
            buffers = jax.tree.map(lambda buffer, value: jax.lax.dynamic_update_index_in_dim(buffer, value, slot, 0),
                                   buffers, records)
            return (x, buffers), rng_state  # the dropout streams, advanced

        if remat:  # prevent_cse is for unrolled code; a scan body needs no barrier
            body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
        rows = stacked_row_masks(ffn_masks, self.num_layers)
        index = jnp.arange(self.num_layers, dtype=jnp.int32)
        buffers = {}
        if recorded:  # the records' shapes, from tracing one layer (nothing runs)
            first = lambda tree: jax.tree.map(lambda a: a[0], tree)
            shapes = jax.eval_shape(layer_step, first(state), x, kind_of_layer[0], first(rows), index[0])[2]
            slots = scratch + (scratch < self.num_layers)
            buffers = jax.tree.map(lambda a: jnp.zeros((slots, *a.shape), a.dtype), shapes)
        (x, buffers), rng_state = jax.lax.scan(body, (x, buffers), (state, kind_of_layer, rows, index))
        nnx.update(self.layer, rng_state)
        for point, stats in buffers.items():  # without the scratch slot
            probes.sow_layers(self, point, recorded, {stat: value[:scratch] for stat, value in stats.items()})
        return x


def stacked_row_masks(ffn_masks: masks.FFNMasks, num_layers: int) -> masks.RowMask | None:
    """{layer: RowMask} -> one RowMask with rows [L, k], values [L, k, d_model] (None without masks).

    Layers without a mask take row 0 times 1 (recomputed unchanged); a mask with fewer than k rows repeats its
    last row, which writes the same value again.

    Args:
      ffn_masks: {layer (0-based): RowMask}, on one expert at most; masks of no rows are dropped.
      num_layers: L, the model's decoder layers.

    Returns:
      The stacked RowMask (the scan's per-layer input), or None when no mask has a row.
    """
    ffn_masks = {layer: mask for layer, mask in ffn_masks.items() if mask.k}
    if not ffn_masks:
        return None
    first = next(iter(ffn_masks.values()))
    k = max(mask.k for mask in ffn_masks.values())
    d_model, dtype = first.values.shape[1], jnp.result_type(*(mask.values for mask in ffn_masks.values()))
    rows, values = [], []
    for layer in range(num_layers):
        mask = ffn_masks.get(layer)
        if mask is None:
            rows.append(jnp.zeros((k,), jnp.int32))
            values.append(jnp.ones((k, d_model), dtype))
        else:
            pad = k - mask.k
            rows.append(jnp.concatenate([mask.rows, jnp.repeat(mask.rows[-1:], pad)]).astype(jnp.int32))
            values.append(jnp.concatenate([mask.values, jnp.repeat(mask.values[-1:], pad, axis=0)]).astype(dtype))
    return masks.RowMask(rows=jnp.stack(rows), values=jnp.stack(values), expert=first.expert)


def stack_layers(model: nnx.Module) -> nnx.Module:
    """A copy of `model` whose `model.model.layers` is a LayerStack.

    The caller's model is untouched; the stack is a new array, so both layouts are held until the caller drops
    its own.

    Args:
      model: an mwjax causal LM (an already stacked one is only copied).

    Returns:
      The stacked copy (the same logits).
    """
    model = nnx.clone(model)
    if not isinstance(model.model.layers, LayerStack):
        model.model.layers = LayerStack(list(model.model.layers))
    return model


def unstack_layers(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with `model.model.layers[i]` again (converters, probes, PEFT export, save_hf).

    Args:
      model: an mwjax causal LM (an unstacked one is only copied).

    Returns:
      The unrolled copy, its layers slices of the stack.
    """
    model = nnx.clone(model)
    if isinstance(model.model.layers, LayerStack):
        model.model.layers = nnx.List(model.model.layers.layers())
    return model
