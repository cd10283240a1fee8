"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) around the pure-functional model.

The model (`models.transformer.Proj`) adds `scale * x A B` wherever its params hold adapters ('lora_a',
'lora_b' next to a projection's kernel) and dequantises kernels stored quantised ('qkernel', 'qscale'), so
everything here is a function of param trees:

    trainable, base = lora.setup(config, model, params, rng, mesh)   # full fine-tuning: (params, None)
    full = lora.combine(trainable, base)     # what the model is applied to (a dict merge: no copy)
    base                                      # the frozen reference: the same weights with adapters off
    lora.merge(trainable, base, cfg)          # plain float32 params (W + scale A B) for exports

Only `trainable` (adapters, and a reward / value model's scalar head) is in the train state, so gradients
and the optimizer state exist only for it; `base` is passed to every jitted step as an argument
(`with_base`), never baked into the program. `config.lora.base_dtype` stores the base's block
projections as float32, bfloat16, int8 (per output channel) or nf4 (blocks of 64, `models/quant.py`).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from instructgpt_jax import sharding
from instructgpt_jax.models import ModelConfig, Transformer
from instructgpt_jax.models import quant

ADAPTER_LEAVES = ("lora_a", "lora_b")
QUANT_LEAVES = ("qkernel", "qscale")
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
# The block projections a base stores in base_dtype, with their number of input axes (Proj's in_shape).
PROJECTIONS = {"query": 1, "key": 1, "value": 1, "out": 2, "wi": 1, "wi_gate": 1, "wi_up": 1, "wo": 1}


def enabled(config) -> bool:
    return "lora" in config and config.lora.rank > 0


def check_config(config) -> None:
    from instructgpt_jax.errors import UserError
    if "lora" not in config:
        return
    cfg = config.lora
    if cfg.base_dtype not in BASE_DTYPES:
        raise UserError(f"config.lora.base_dtype={cfg.base_dtype!r}; valid: {', '.join(BASE_DTYPES)}")
    if cfg.rank < 0:
        raise UserError(f"config.lora.rank={cfg.rank}: must be >= 0 (0 = off: full fine-tuning)")
    if cfg.rank and cfg.alpha <= 0:
        raise UserError(f"config.lora.alpha={cfg.alpha}: must be > 0")
    if not cfg.rank and cfg.base_dtype != "float32":
        raise UserError(f"config.lora.base_dtype={cfg.base_dtype!r} stores a frozen base, which only LoRA has: "
                        f"set config.lora.rank > 0 (QLoRA), or base_dtype=float32")
    if not cfg.rank and config.init.get("adapter"):
        raise UserError("config.init.adapter needs config.lora.rank > 0")
    try:
        m = ModelConfig.from_config(config.model, cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.rank and cfg.base_dtype == "nf4":  # before anything is written: the blocks' input widths and last axes
        widths = {"d_model": m.d_model, "num_heads * head_dim": m.num_heads * m.head_dim, "mlp_dim": m.mlp_dim}
        bad = [f"{k}={v}" for k, v in widths.items() if v % quant.BLOCK] + ([f"head_dim={m.head_dim}"]
                                                                            if m.head_dim % 2 else [])
        if bad:
            raise UserError(f"config.lora.base_dtype='nf4' needs the projections' input widths to be multiples of "
                            f"{quant.BLOCK} and head_dim even ({', '.join(bad)}); use base_dtype=int8")


def model_config(config) -> ModelConfig:
    """The stage's model config: `config.model` plus `config.lora`'s adapters when rank > 0."""
    return ModelConfig.from_config(config.model, config.get("lora"))


def with_lora(model: Transformer, config) -> Transformer:
    """`model` (e.g. a reward model loaded from its export) with `config.lora`'s adapters."""
    cfg = ModelConfig.from_config(dataclasses.asdict(model.cfg), config.get("lora"))
    return Transformer(cfg, head=model.head)


def plain(model: Transformer) -> Transformer:
    """The model without adapters: what base weights (exports, Hugging Face checkpoints) are loaded into."""
    return Transformer(dataclasses.replace(model.cfg, lora_rank=0), head=model.head)


# ----------------------------------------------------------------------------- param trees

def select(tree: dict, keep) -> dict:
    """The nested-dict subtree of leaves whose path (a tuple of keys) satisfies `keep`; empty dicts dropped."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = select(v, lambda p, k=k: keep((k,) + p))
            if sub:
                out[k] = sub
        elif keep((k,)):
            out[k] = v
    return out


def is_adapter(path) -> bool:
    return path[-1] in ADAPTER_LEAVES


def adapters(params: dict) -> dict:
    return select(params, is_adapter)


def combine(trainable: dict, base: dict | None) -> dict:
    """The params the model is applied to: `base` with `trainable`'s leaves added (or replacing base's:
    a value model's head over the reward model's). A dict merge: no array is copied. base None: trainable."""
    if base is None:
        return trainable
    out = dict(base)
    for k, v in trainable.items():
        out[k] = combine(v, base[k]) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def with_base(loss_fn):
    """A stage loss `loss_fn(params, batch, rng, frozen)` taking `frozen = (base, frozen')` instead: it sees
    `combine(params, base)` and `frozen'` (so the train step differentiates the trainable leaves only)."""
    @functools.wraps(loss_fn)
    def fn(params, batch, rng, frozen):
        base, rest = frozen
        return loss_fn(combine(params, base), batch, rng, rest)
    return fn


# ----------------------------------------------------------------------------- init

def init_adapters(model: Transformer, rng, mesh) -> dict:
    """Fresh adapters of a LoRA model (A Gaussian, B zero), created already sharded like the weights they
    adapt; the base params the init would also make are never computed (only the adapters are outputs)."""
    def init_fn(r):
        return adapters(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"])
    return sharding.init_sharded(init_fn, rng, mesh)[0]


def setup(config, model: Transformer, params: dict, rng, mesh, heads=(), adapter_params=None):
    """(trainable, base) of a stage from its starting params (plain, float32, on the mesh).

    Full fine-tuning (config.lora.rank 0): (params, None). LoRA: fresh adapters (or `adapter_params`, e.g. a
    PEFT adapter `config.init.adapter` loaded) plus the params under `heads` (a reward model's 'scalar_head'),
    and the rest stored in config.lora.base_dtype. The starting params' arrays are reused, not copied."""
    if not enabled(config):
        return params, None
    trainable = adapter_params if adapter_params is not None else init_adapters(model, rng, mesh)
    trainable = combine({h: jax.tree.map(jnp.copy, params[h]) for h in heads if h in params}, trainable)
    return trainable, store_base(params, config.lora.base_dtype)


def _is_projection(path) -> bool:
    return len(path) >= 3 and path[0] == "layers" and path[-2] in PROJECTIONS and path[-1] == "kernel"


def _fitted(spec: P, shape, mesh) -> NamedSharding:
    """`spec` with the axes that do not divide `shape` replicated instead."""
    axes = []
    for dim, a in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if a is None else (a if isinstance(a, tuple) else (a,))
        axes.append(a if dim % int(np.prod([mesh.shape[n] for n in names])) == 0 else None)
    return NamedSharding(mesh, P(*axes))


def store_base(params: dict, base_dtype: str) -> dict:
    """The frozen base: the block projections' kernels in `base_dtype` (bfloat16; int8 / nf4 as 'qkernel' +
    'qscale', models/quant.py), every other param as it is. float32: `params` itself."""
    if base_dtype == "float32":
        return params

    def convert(node, path=()):
        out = {}
        for k, v in node.items():
            p = path + (k,)
            if isinstance(v, dict):
                out[k] = convert(v, p)
            elif not _is_projection(p):
                out[k] = v
            elif base_dtype == "bfloat16":
                out[k] = jax.jit(lambda x: x.astype(jnp.bfloat16), out_shardings=v.sharding)(v)
            else:
                out.update(_quantize(v, PROJECTIONS[p[-2]], base_dtype))
        return out
    return convert(params)


def _quantize(kernel, n_in: int, fmt: str) -> dict:
    """One stacked kernel [layers, *in, *out] -> {'qkernel', 'qscale'}, sharded like the kernel where they can be."""
    mesh, spec = kernel.sharding.mesh, tuple(kernel.sharding.spec) + (None,) * kernel.ndim
    codes, scale = jax.eval_shape(lambda x: quant.quantize(x, n_in, fmt, lead=1), kernel)
    out_axes = spec[1 + n_in:kernel.ndim]
    scale_spec = P(spec[0], *out_axes) if fmt == "int8" else P(spec[0], None, *out_axes)
    shardings = (_fitted(P(*spec[:kernel.ndim]), codes.shape, mesh), _fitted(scale_spec, scale.shape, mesh))
    codes, scale = jax.jit(lambda x: quant.quantize(x, n_in, fmt, lead=1), out_shardings=shardings)(kernel)
    return {"qkernel": codes, "qscale": scale}


def base_kernel(node: dict):
    """A projection's kernel from a base's param dict, float32 (dequantised if stored quantised)."""
    if "qkernel" in node:
        return quant.dequantize_stacked(node["qkernel"], node["qscale"])
    return node["kernel"].astype(jnp.float32)


def _merge(full: dict, scale: float) -> dict:
    def walk(node):
        if "kernel" in node or "qkernel" in node:
            out = {k: v for k, v in node.items() if k not in ADAPTER_LEAVES + QUANT_LEAVES + ("kernel",)}
            kernel = base_kernel(node)
            if "lora_a" in node:
                a, b = node["lora_a"], node["lora_b"]
                lead, r = a.shape[0], a.shape[-1]
                delta = jnp.matmul(a.reshape(lead, -1, r), b.reshape(lead, r, -1)).reshape(kernel.shape)
                kernel = kernel + scale * delta
            out["kernel"] = kernel
            return out
        return {k: walk(v) if isinstance(v, dict) else v for k, v in node.items()}
    return walk(full)


def merge(trainable: dict, base: dict | None, cfg: ModelConfig) -> dict:
    """Plain float32 params of `combine(trainable, base)`: each adapted kernel W + scale * A B, quantised or
    bfloat16 kernels back in float32, no adapter leaves: what any plain model (later stages, transformers
    exports) loads. Full fine-tuning (base None): `trainable` itself."""
    if base is None:
        return trainable
    full = combine(trainable, base)
    return jax.jit(functools.partial(_merge, scale=cfg.lora_scale if cfg.lora_rank else 1.0))(full)


def meta(config, source: str = "") -> dict:
    """What an export records of its adapters (`checkpoints.export(adapter=...)`): the config.lora block and
    the base they apply to (`source`: the checkpoint the stage started from)."""
    return dict(config.lora.to_dict(), base=source)
