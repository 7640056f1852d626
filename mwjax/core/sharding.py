"""Meshes and shardings: one table of logical axes, mapped onto a ("data", "fsdp", "tensor") mesh.

Parameters declare the logical axes of their dimensions where the module creates them (`param`), as Flax's own
sharding metadata (`sharding_names`, kept as `out_sharding`, with the rules table as `sharding_rules`), so
`nnx.get_partition_spec` / `nnx.get_named_sharding` read an mwjax model as any Flax model; logical axes map to
mesh axes through LOGICAL_RULES (as maxtext's `logical_axis_rules`). The frozen base is sharded FSDP x
tensor-parallel; LoRA adapters, norms and the rest are replicated; batches are split over ("data", "fsdp"), and
the residual stream between decoder layers is constrained to that split wherever a step is traced on a mesh
(`constrain`). A dimension that a mesh axis does not divide is left unsharded rather than failing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mwjax.core.paths import dotted

MESH_AXES = ("data", "fsdp", "tensor")

# (dotted parameter path, shape, the parameter's declared logical axes or None) -> where its array lives
ShardingFn = Callable[[str, tuple[int, ...], tuple[str | None, ...] | None], jax.sharding.Sharding]


LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",  # attention projections' head-major feature axis
    "mlp": "tensor",  # d_ff
    "vocab": "tensor",
    "experts": None,
    "layers": None,  # the stacked decoder layers' leading axis (`mwjax.nn.stack`): each device holds all
}



Axes = tuple[str | None, ...]  # logical axis names, one per dimension (keys of `LOGICAL_RULES`)
AXES = "out_sharding"  # the Variable metadata that holds them: Flax's (`sharding_names=` at construction)
RULES = tuple(LOGICAL_RULES.items())  # the table as Flax's `sharding_rules` metadata


def param(value: jax.Array, axes: Axes, kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    """A parameter with its logical axes declared.

    Flax's `nnx.Param(value, sharding_names=axes)`, with the rules that map the names onto a mesh and without
    Flax's eager sharding (which would need a mesh wherever a model is built): the loader and the trainer
    place each array themselves (`param_sharding_fn`, which also leaves a dimension a mesh axis does not divide
    unsharded).

    Args:
      value: the initial array.
      axes: one logical axis name (a key of LOGICAL_RULES), or None, per dimension of `value`.
      kind: the Variable type (`nnx.Param`, or another Variable subclass).

    Returns:
      The Variable, carrying `axes` as its `out_sharding` metadata.
    """
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a parameter of shape {value.shape}")
    check_axes(axes)
    return kind(value, sharding_names=tuple(axes), sharding_rules=RULES, eager_sharding=False)


def check_axes(axes: Sequence[str | None]) -> None:
    """Refuse a logical axis name the rules table does not know (a misspelt name would leave its dimension
    replicated on every device without a word).

    Args:
      axes: logical axis names or None, one per dimension.

    Raises:
      ValueError naming the unknown axis and the known ones.
    """
    unknown = [a for a in axes if a is not None and a not in LOGICAL_RULES]
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r} in {tuple(axes)}: the rules table "
                         f"(mwjax.core.sharding.LOGICAL_RULES) knows {sorted(LOGICAL_RULES)}")


def declared_axes(state: nnx.State) -> dict[str, Axes]:
    """The logical axes declared by the Variables of a model state.

    Args:
      state: an `nnx.State` (e.g. from `nnx.split(model)`).

    Returns:
      {dotted parameter path: its declared logical axes} for every Variable of `state` that declares them.
    """
    out = {}
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get(AXES)
        if axes is not None:
            out[".".join(map(str, path))] = axes
    return out


HIDDEN_AXES: Axes = ("batch", None, None)  # the residual stream [b, t, d_model] between blocks: rows over the
# data-parallel axes (FSDP gathers the weights, never the activations), tokens and features whole on each device


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """`x` constrained to its logical `axes` on the mesh it is traced under (`traced_on`, as the trainer's steps
    are), so that a mesh run does not depend on how XLA propagates shardings.

    A dimension the mesh axes do not divide stays whole, as for parameters (`spec`).

    Args:
      x: an array [...] (e.g. the residual stream [b, t, d_model]).
      axes: its logical axes, one per dimension (e.g. HIDDEN_AXES).

    Returns:
      `x` under `jax.lax.with_sharding_constraint`; `x` itself when not traced on a mesh (one device, analysis).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes, x.shape, mesh))


def traced_on(mesh: Mesh):
    """Context for tracing a step on `mesh`: `constrain` applies its constraints there.

    Args:
      mesh: the device mesh (`make_mesh`).

    Returns:
      A context manager (`jax.sharding.use_abstract_mesh` of the mesh's abstract mesh).
    """
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices`; one size may be -1 (the devices left over).

    Args:
      data: size of the "data" axis (pure data parallelism).
      fsdp: size of the "fsdp" axis (batch split and weights sharded, FSDP).
      tensor: size of the "tensor" axis (tensor parallelism: heads, d_ff, vocab).
      devices: the devices to arrange; None for all of `jax.devices()`.

    Returns:
      The `jax.sharding.Mesh`.

    Raises:
      ValueError: the sizes do not multiply to the device count (or more than one is -1).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh axes {asked}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of a value with these logical axes (through LOGICAL_RULES).

    Mesh axes of size 1 are dropped, and a dimension that its mesh axes do not divide is left unsharded.

    Args:
      logical: logical axis names (or None), one per dimension.
      shape: the value's shape.
      mesh: the mesh (or abstract mesh) whose axis sizes decide.

    Returns:
      The `PartitionSpec`.
    """
    check_axes(logical)
    parts = []
    for axis, dim in zip(logical, shape, strict=True):
        mapped = LOGICAL_RULES[axis] if axis else None
        names = (mapped,) if isinstance(mapped, str) else tuple(mapped or ())
        names = tuple(n for n in names if mesh.shape[n] > 1)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        parts.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
    return PartitionSpec(*parts)


def param_sharding_fn(mesh: Mesh) -> ShardingFn:
    """Where each parameter lives on `mesh`, as a function for converters.load / checkpoint.restore.

    Args:
      mesh: the device mesh.

    Returns:
      A `ShardingFn`: (dotted parameter path, shape, declared logical axes or None) -> NamedSharding
      (undeclared axes: replicated).
    """
    return lambda path, shape, axes: NamedSharding(mesh, spec(axes or (None,) * len(shape), shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh):
    """The shardings of a model state on `mesh`.

    Args:
      state: an `nnx.State` (or its abstract version from `nnx.eval_shape`).
      mesh: the device mesh.

    Returns:
      A pytree of NamedShardings matching `state` (parameters by their declared axes, anything else replicated).
    """
    fn, axes = param_sharding_fn(mesh), declared_axes(state)

    def one(path, leaf):
        name = dotted(path).removesuffix(".value")  # Variables flatten to their `.value`
        return fn(name, tuple(getattr(leaf, "shape", ())), axes.get(name))

    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """The sharding of batches: rows split over ("data", "fsdp"), the other dimensions whole.

    Args:
      mesh: the device mesh.
      ndim: the batch arrays' number of dimensions.
      axis: the batch dimension (e.g. 1 for [grad_accum, batch, seq]).

    Returns:
      The NamedSharding.
    """
    names = tuple(n for n in LOGICAL_RULES["batch"] if mesh.shape[n] > 1)
    parts = [None] * ndim
    parts[axis] = names or None
    return NamedSharding(mesh, PartitionSpec(*parts))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`.

    Args:
      mesh: the device mesh.

    Returns:
      NamedSharding(mesh, PartitionSpec()).
    """
    return NamedSharding(mesh, PartitionSpec())


def put(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works when a sharding spans several processes.

    Values local to this process (freshly initialised adapters, optimizer state, keys: the same on every
    process, as they come from the same seeds) are cut into this process's shards; arrays already spread over
    processes are resharded in a compiled identity (no host gathers them).

    Args:
      tree: a pytree of arrays (jax or numpy; typed PRNG keys included).
      shardings: one Sharding for every leaf, or a matching pytree.

    Returns:
      The tree with every leaf a `jax.Array` placed as `shardings` says.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, target):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x), target), impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding == target else jax.jit(lambda a: a, out_shardings=target)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def shaped(tree, shardings):
    """`put` for an abstract tree, for lowering and compiling without weights.

    Args:
      tree: a pytree with `jax.ShapeDtypeStruct` leaves (e.g. from `nnx.eval_shape`).
      shardings: one Sharding for every leaf, or a matching pytree.

    Returns:
      The same tree, each leaf a `jax.ShapeDtypeStruct` carrying its sharding.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
