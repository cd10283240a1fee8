"""The only module that knows mesh axes.

One mesh with axes ('data', 'fsdp', 'tensor'). Models name logical axes; `RULES` maps them to
mesh axes. Params are created already sharded (eval_shape -> shardings -> jit(init,
out_shardings)), batches become global arrays sharded over ('data', 'fsdp').
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or axes, or None = replicated)
RULES = (
    # weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("length", None),
    ("norm", None),
    ("lora", None),  # LoRA rank: adapters shard like the weight they adapt on its other axes
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Mesh from `config.mesh.{data,fsdp,tensor}`; one axis may be -1 (= the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad or len(fill) > 1:
        raise ValueError(f"config.mesh: axis sizes must be positive, with at most one -1; got {sizes}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n % fixed:
            raise ValueError(f"config.mesh {sizes}: the fixed axes (product {fixed}) do not divide the "
                             f"{n} available devices")
        sizes[fill[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices but {n} are available "
                         f"(set one axis to -1 to fill the rest)")
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        dev_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU / simulated devices have no topology to optimise for
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES)


@contextlib.contextmanager
def use(mesh: Mesh):
    """Trace under this mesh and rules, so the models' activation constraints take effect."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def _mesh_axes(logical: tuple) -> P:
    return nn.logical_to_mesh_axes(logical, RULES)


def logical_to_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, what: str = "params") -> Any:
    """NamedShardings for a tree of logical PartitionSpecs, checking that every sharded dim divides."""
    def one(path, spec, shape):
        spec = spec if spec is not None else P()
        mesh_spec = _mesh_axes(tuple(spec))
        for dim, (axes, size) in enumerate(zip(mesh_spec, shape.shape)):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            n = math.prod(mesh.shape[a] for a in axes)
            if size % n:
                hint = (f" or round config.model.vocab_size up to a multiple of {n}" if spec[dim] == "vocab" else "")
                raise ValueError(
                    f"{what}{jax.tree_util.keystr(path)}: dimension {dim} (logical axis {spec[dim]!r}) has size "
                    f"{size}, which mesh axis {'x'.join(axes)} of size {n} does not divide; change config.mesh{hint}")
        return NamedSharding(mesh, mesh_spec)
    return jax.tree_util.tree_map_with_path(one, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P) or x is None)


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh):
    """Run a Flax init that returns boxed (logically partitioned) params straight into their shardings.

    Returns (params, shardings), both plain (unboxed) pytrees.
    """
    abstract = jax.eval_shape(init_fn, rng)
    specs = nn.get_partition_spec(abstract)
    shapes = nn.unbox(abstract)
    shardings = logical_to_shardings(specs, shapes, mesh)
    # Not under `use(mesh)`: flax's DenseGeneral re-boxes a reshaped kernel during init, which a
    # logical constraint would reject; out_shardings place every param anyway.
    params = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return params, shardings


def param_shardings(init_fn: Callable[[jax.Array], Any], mesh: Mesh):
    """(abstract params, shardings) without allocating anything."""
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shapes = nn.unbox(abstract)
    return shapes, logical_to_shardings(nn.get_partition_spec(abstract), shapes, mesh)


def _model_init(model):
    import jax.numpy as jnp
    return lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]


def init_model(model, rng: jax.Array, mesh: Mesh):
    """Fresh params of a Flax model (called on [1, 8] tokens), created already sharded."""
    return init_sharded(_model_init(model), rng, mesh)[0]


def model_abstract(model, mesh: Mesh):
    """Abstract params of a model with their shardings on `mesh` (jax.ShapeDtypeStruct leaves)."""
    shapes, shardings = param_shardings(_model_init(model), mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_optimizer(tx: optax.GradientTransformation, params: Any):
    """`tx.init(params)` with every params-shaped part of the state (Adam mu and nu) sharded like the
    params and the rest (step counts) replicated. A plain `jax.jit(tx.init)` leaves those zeros
    replicated on every device, so the optimizer state (2x the params) would not be sharded at all."""
    shardings = jax.tree.map(lambda x: x.sharding, params)
    repl = replicated(jax.tree.leaves(shardings)[0].mesh)
    out = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
                                transform_non_params=lambda _: repl)
    return jax.jit(tx.init, out_shardings=out)(params)


def place(tree: Any, mesh: Mesh):
    """Put a train state on the mesh: leaves already on a NamedSharding keep it, the rest (step
    counters, optimizer counts) are replicated. Returns (tree, shardings). Without this, scalars
    made outside the mesh have a different type from the step's outputs and the step compiles twice."""
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding)
                             else replicated(mesh), tree)
    return jax.device_put(tree, shardings), shardings


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def default_mesh() -> Mesh:
    """Every device on the fsdp axis: what a notebook gets without a config."""
    return make_mesh({"data": 1, "fsdp": -1, "tensor": 1})


def data_parallel_size(mesh: Mesh) -> int:
    """Ways a batch is split: rows per step must be a multiple of this."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def tensor_parallel_size(mesh) -> int:
    """Ways heads / MLP / vocabulary are split."""
    return mesh.shape["tensor"]


def param_shard_count(mesh) -> int:
    """Ways each layer's weights are split by FSDP (gathered for compute)."""
    return mesh.shape["fsdp"]


def divides_batch(rows: int, mesh: Mesh) -> bool:
    return rows % data_parallel_size(mesh) == 0


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
    n = data_parallel_size(mesh)
    if global_batch % n:
        raise ValueError(f"batch size {global_batch} is not divisible by the data-parallel degree "
                         f"data*fsdp = {n}; change config.train.batch_size or config.mesh")
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} is not divisible by the {jax.process_count()} processes")
    return global_batch // jax.process_count()


def host_to_global(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of a batch (numpy) -> global jax arrays sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype == object:  # strings etc. stay on the host
            continue
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def global_from_full(batch: dict, mesh: Mesh) -> dict:
    """A batch every process holds in full (numpy) -> global arrays sharded over the batch axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype != object:
            out[k] = jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim), lambda idx, v=v: v[idx])
    return out


def to_host(x):
    """Fully-replicated / addressable global arrays -> numpy (works multi-process)."""
    return jax.tree.map(lambda a: np.asarray(jax.experimental.multihost_utils.process_allgather(a, tiled=True))
                        if isinstance(a, jax.Array) and not a.is_fully_addressable else np.asarray(a), x)
