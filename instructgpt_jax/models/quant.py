"""Storage formats of a frozen base's projection kernels (QLoRA, Dettmers et al. 2023): pure functions.

A kernel [*in, *out] (our layout: inputs first, as `Proj` contracts them; torch's Linear weight is its
transpose) is stored as two arrays, and `dequantize` tells the format from the codes' dtype:

  nf4   uint8 codes [*in, *out / 2]: 4-bit indices into the NormalFloat codebook `NF4`, two per byte along
        the last axis (the even element in the high nibble); float32 absmax [I / 64, *out], one per block of
        64 consecutive input weights of each output (I = prod(in)): bitsandbytes' blocks of a torch
        [out, in] weight. No double quantisation of the absmax.
  int8  int8 codes [*in, *out]; float32 scale [*out] = absmax over the inputs / 127 (per output channel).

Both take `n_in` (how many leading axes are inputs) and any number of leading batch axes (a layer stack).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64  # NF4 block size (QLoRA)
# The NF4 codebook (QLoRA, appendix E; bitsandbytes' values): quantiles of N(0, 1) normalised to [-1, 1],
# with an exact zero.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
FORMATS = ("nf4", "int8")


def _in_size(shape, lead: int, n_in: int) -> int:
    return int(np.prod(shape[lead:lead + n_in]))


def check_quantizable(shape, n_in: int, fmt: str, lead: int = 0, what: str = "kernel") -> None:
    if fmt == "nf4":
        size = _in_size(shape, lead, n_in)
        if size % BLOCK or shape[-1] % 2:
            raise ValueError(f"{what} {tuple(shape)}: nf4 needs its input width ({size}) to be a multiple of "
                             f"{BLOCK} and its last axis ({shape[-1]}) even; use config.lora.base_dtype=int8")
    elif fmt != "int8":
        raise ValueError(f"quantisation format {fmt!r}; valid: {', '.join(FORMATS)}")


def quantize(kernel, n_in: int, fmt: str, lead: int = 0):
    """kernel [*lead, *in, *out] float -> (codes, scale) in format `fmt` (see the module docstring)."""
    check_quantizable(kernel.shape, n_in, fmt, lead)
    x = jnp.asarray(kernel, jnp.float32)
    lead_shape, in_shape, out_shape = x.shape[:lead], x.shape[lead:lead + n_in], x.shape[lead + n_in:]
    if fmt == "int8":
        axes = tuple(range(lead, lead + n_in))
        scale = jnp.max(jnp.abs(x), axis=axes) / 127.0
        codes = jnp.round(x / jnp.expand_dims(jnp.where(scale > 0, scale, 1.0), axes))
        return jnp.clip(codes, -127, 127).astype(jnp.int8), scale
    size = _in_size(x.shape, lead, n_in)
    blocks = x.reshape(*lead_shape, size // BLOCK, BLOCK, *out_shape)
    absmax = jnp.max(jnp.abs(blocks), axis=lead + 1)  # [*lead, I / 64, *out]
    normed = blocks / jnp.expand_dims(jnp.where(absmax > 0, absmax, 1.0), lead + 1)
    # nearest codebook value; the codebook is sorted, so compare with the midpoints between neighbours
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    idx = jnp.sum(normed[..., None] > mids, axis=-1).astype(jnp.uint8)
    idx = idx.reshape(*lead_shape, *in_shape, *out_shape)
    pairs = idx.reshape(*idx.shape[:-1], idx.shape[-1] // 2, 2)
    return (pairs[..., 0] << 4 | pairs[..., 1]).astype(jnp.uint8), absmax


def dequantize(codes, scale, dtype=jnp.float32):
    """(codes, scale) of one kernel (no leading batch axes) -> the kernel [*in, *out] in `dtype`."""
    if codes.dtype == jnp.int8:
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    if codes.dtype != jnp.uint8:
        raise ValueError(f"quantised codes of dtype {codes.dtype}; expected uint8 (nf4) or int8")
    n_in = codes.ndim - scale.ndim + 1
    idx = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
    values = jnp.asarray(NF4)[idx.astype(jnp.int32)]
    in_shape, out_shape = values.shape[:n_in], values.shape[n_in:]
    blocks = values.reshape(scale.shape[0], BLOCK, *out_shape) * scale[:, None]
    return blocks.reshape(*in_shape, *out_shape).astype(dtype)


def dequantize_stacked(codes, scale, dtype=jnp.float32):
    """`dequantize` over a leading layer axis."""
    return jax.vmap(lambda c, s: dequantize(c, s, dtype))(codes, scale)
