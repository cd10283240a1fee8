"""Decoder-only transformer: GPT-3 (learned positions, LayerNorm, GELU), LLaMA (RoPE, RMSNorm, gated
MLP, grouped-query attention) or GPT-NeoX (RoPE, LayerNorm, GELU, biases), chosen by `ModelConfig.arch`.

Hugging Face families are the same code with config keys (see config_lib.model_config): Qwen2 q/k/v
biases, Qwen3 per-head q/k RMSNorm, Gemma embedding scale, (1 + w) RMSNorm and GeGLU, Gemma 2 pre-
and post-norms, soft-capped attention / final logits and a query scale, Mistral / Gemma 2 sliding-
window attention (per layer, as a scanned per-layer window), GPT-NeoX parallel residual and partial
rotary, Llama-3 RoPE frequency scaling.

The model is a pure function of (params, tokens, positions, segment_ids): `segment_ids` gives
each token its packed example (0 = padding), so attention never crosses an example and never
looks at padding. Every weight names its logical axes ('embed', 'heads', 'mlp', 'vocab', ...);
only `sharding.py` maps them to mesh axes.

Heads: 'lm' returns logits [B, T, V]; 'scalar' returns one float32 per token [B, T] from a
linear head on the final hidden state (reward model, value model).

KV cache (sampling): pass `cache=init_cache(...)` and `cache_index` (where the new tokens go);
the call returns `(outputs, new_cache)`. The cache also stores each slot's segment id so that
left padding of a prompt stays masked for every later token. Inside the layer scan each layer
attends to its cached slots as they are plus the call's own keys (one joint softmax) and returns
only its new keys / values; all layers' new slots are then written with one in-place update (a
write inside the scan would make XLA copy the whole cache every step). `last_only=True` computes
the head at the last position only (a prefill needs nothing else); `last_n=N` at the last N positions
(scoring left-padded rows whose scored tokens all end at the last position: lm-eval's log-likelihoods).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructgpt_jax.models import quant

Array = jax.Array

# How to rematerialise a block's activations in the backward pass.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ARCHS = ("gpt", "llama", "neox")
LAYERNORM_ARCHS = ("gpt", "neox")  # LayerNorm with bias, biases on every projection, plain (ungated) MLP
# MLP activations; '' in the config = the arch's own (DEFAULT_ACTIVATION).
ACTIVATIONS = {"gelu_tanh": functools.partial(nn.gelu, approximate=True),
               "gelu": functools.partial(nn.gelu, approximate=False), "silu": nn.silu}
DEFAULT_ACTIVATION = {"gpt": "gelu_tanh", "llama": "silu", "neox": "gelu"}
ROPE_SCALINGS = ("default", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "gpt"
    vocab_size: int = 512
    num_layers: int = 2
    d_model: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    mlp_dim: int = 256
    max_len: int = 128
    dropout: float = 0.0
    dtype: str = "float32"
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    remat: str = "none"
    scan_unroll: int = 1
    causal_blocks: int = 1
    logits_chunk: int = 0  # losses: the LM head over chunks of about this many tokens (scoring.token_stats)
    # Family options; the defaults are plain GPT-3 / LLaMA (meanings: config_lib.model_config).
    activation: str = ""  # '' -> the arch's own, resolved in __post_init__
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False
    embed_scale: bool = False
    sandwich_norm: bool = False
    parallel_residual: bool = False
    rotary_pct: float = 1.0
    rope_scaling: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    query_pre_attn_scalar: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: int = 0
    sliding_pattern: str = "S"
    # LoRA (set from config.lora by `from_config(model, lora)`; rank 0 = none): adapters on the `lora_targets`
    # projections, created by init and used whenever the params hold them (params without them = the base model)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    lora_rslora: bool = False

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"config.model.arch={self.arch!r}; valid: {', '.join(ARCHS)}")
        if not self.activation:
            object.__setattr__(self, "activation", DEFAULT_ACTIVATION[self.arch])
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"config.model.activation={self.activation!r}; valid: '' (the arch's own), "
                             f"{', '.join(ACTIVATIONS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"config.model.rope_scaling={self.rope_scaling!r}; valid: {', '.join(ROPE_SCALINGS)}")
        if not 0.0 < self.rotary_pct <= 1.0 or (self.arch != "gpt" and self.rotary_dim % 2):
            raise ValueError(f"config.model.rotary_pct={self.rotary_pct} must be in (0, 1] and give an even number "
                             f"of rotary dims (head_dim {self.head_dim} -> {self.rotary_dim})")
        if not self.sliding_pattern or set(self.sliding_pattern) - set("SF"):
            raise ValueError(f"config.model.sliding_pattern={self.sliding_pattern!r}; must be a non-empty string of "
                             f"'S' (sliding-window layer) and 'F' (full-attention layer), repeated over the layers")
        for key in ("sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            if getattr(self, key) < 0:
                raise ValueError(f"config.model.{key}={getattr(self, key)}; must be >= 0 (0 = off)")
        if self.arch in LAYERNORM_ARCHS and (self.qkv_bias or self.norm_unit_offset):
            raise ValueError(f"config.model.qkv_bias / norm_unit_offset apply to arch 'llama' only (arch "
                             f"{self.arch!r} has LayerNorms and attention biases already)")
        if self.arch == "gpt" and (self.rotary_pct != 1.0 or self.rope_scaling != "default"):
            raise ValueError("config.model.rotary_pct / rope_scaling apply to arch 'llama' / 'neox' only (arch 'gpt' "
                             "has learned positions)")
        for key in ("scan_unroll", "causal_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"config.model.{key}={getattr(self, key)}; must be >= 1 (1 = off)")
        if self.logits_chunk < 0:
            raise ValueError(f"config.model.logits_chunk={self.logits_chunk}; must be >= 0 (0 = off)")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={self.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"config.model.dtype={self.dtype!r}; valid: float32, bfloat16")
        if self.lora_rank < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"config.lora.rank={self.lora_rank} must be >= 0 and config.lora.dropout="
                             f"{self.lora_dropout} in [0, 1)")
        lora_modules(self)  # valid targets
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config.model.num_heads={self.num_heads} is not a multiple of "
                             f"config.model.num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_config(cls, model_cfg, lora_cfg=None) -> "ModelConfig":
        """From the `config.model` ConfigDict (extra informational keys such as 'preset' are ignored) and,
        for a LoRA model, the `config.lora` block (its rank, alpha, dropout, targets, rslora)."""
        names = {f.name for f in dataclasses.fields(cls)}
        keys = {k: v for k, v in dict(model_cfg).items() if k in names}
        if lora_cfg is not None and lora_cfg.get("rank", 0):
            keys.update({f"lora_{k}": lora_cfg[k] for k in ("rank", "alpha", "dropout", "targets", "rslora")})
        return cls(**keys)

    @property
    def lora_scale(self) -> float:
        """What the adapters' product is multiplied by: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
        return self.lora_alpha / (math.sqrt(self.lora_rank) if self.lora_rslora else self.lora_rank)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def rotary_dim(self) -> int:
        """Leading dims of each head that RoPE rotates (all of them unless rotary_pct < 1), as HF: int()."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def layer_windows(self) -> tuple:
        """Per layer: the sliding window (keys at most window - 1 slots back), or 0 for full attention."""
        pattern = self.sliding_pattern
        return tuple(self.sliding_window if pattern[i % len(pattern)] == "S" else 0 for i in range(self.num_layers))


# LoRA targets (PEFT's short names) -> our projection modules; 'up' is the ungated MLP's input of gpt / neox
LORA_TARGETS = {"q": "attn/query", "k": "attn/key", "v": "attn/value", "o": "attn/out", "gate": "mlp/wi_gate",
                "up": "mlp/wi_up", "down": "mlp/wo"}


def lora_modules(cfg: ModelConfig) -> tuple:
    """The projections (e.g. 'attn/query', 'mlp/wo') that `cfg.lora_targets` adapts ('all-linear': every
    projection of a block; the LM head and embeddings are never adapted, as in PEFT's 'all-linear')."""
    gated = cfg.arch not in LAYERNORM_ARCHS
    names = dict(LORA_TARGETS, up="mlp/wi_up" if gated else "mlp/wi")
    spec = cfg.lora_targets.replace(" ", "")
    chosen = [t for t in names if gated or t != "gate"] if spec == "all-linear" else spec.split(",")
    bad = [t for t in chosen if t not in names or (t == "gate" and not gated)]
    if bad or not chosen:
        valid = ", ".join(t for t in names if gated or t != "gate")
        raise ValueError(f"config.lora.targets={cfg.lora_targets!r}: unknown target(s) {bad} for arch {cfg.arch!r}; "
                         f"valid: 'all-linear' or a comma list of {valid}")
    return tuple(names[t] for t in chosen)


def _init(names, scale=0.02):
    return nn.with_logical_partitioning(nn.initializers.normal(scale), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class Norm(nn.Module):
    """LayerNorm (gpt, neox) or RMSNorm (llama) over the last axis, statistics in float32.

    norm_unit_offset (Gemma): the RMSNorm scales by (1 + w) in float32, w initialised at 0.
    """
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        if self.cfg.arch in LAYERNORM_ARCHS:
            return nn.LayerNorm(epsilon=self.cfg.norm_eps, dtype=self.cfg.compute_dtype,
                                scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)))(x)
        offset = self.cfg.norm_unit_offset
        scale = self.param("scale", (_zeros if offset else _ones)(("norm",)), (x.shape[-1],), jnp.float32)
        if offset:
            scale = 1.0 + scale.astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale).astype(self.cfg.compute_dtype)


def rope_inv_freq(theta: float, dim: int, scaling: Optional[dict] = None) -> Array:
    """[dim / 2] float32 RoPE inverse frequencies theta^(-2i/dim).

    scaling: {'rope_type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor',
    'original_max_position_embeddings'} (Llama 3.1): wavelengths longer than original / low_freq_factor
    are stretched by `factor`, shorter than original / high_freq_factor kept, and those between
    interpolated smoothly; None or rope_type 'default' = plain RoPE.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    if not scaling or scaling["rope_type"] == "default":
        return inv_freq
    if scaling["rope_type"] != "llama3":
        raise ValueError(f"rope_type {scaling['rope_type']!r}; valid: {', '.join(ROPE_SCALINGS)}")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    stretched = jnp.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.where(medium, smoothed, stretched)


def rope(x: Array, positions: Array, theta: float, *, rotary_dim: Optional[int] = None,
         scaling: Optional[dict] = None) -> Array:
    """Rotary embedding, 'rotate half' layout (the Hugging Face LLaMA / GPT-NeoX convention).

    x: [B, T, N, D]; positions: [B, T]. rotary_dim: rotate only the first rotary_dim dims of each
    head (GPT-NeoX's partial rotary), the rest pass through. scaling: see `rope_inv_freq`.
    """
    d = x.shape[-1]
    r = d if rotary_dim is None else rotary_dim
    inv_freq = rope_inv_freq(theta, r, scaling)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    xr = x32 if r == d else x32[..., :r]
    x1, x2 = jnp.split(xr, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xr * jnp.cos(angles) + rotated * jnp.sin(angles)
    if r < d:
        out = jnp.concatenate([out, x32[..., r:]], axis=-1)
    return out.astype(x.dtype)


def _rope_scaling(cfg: ModelConfig) -> Optional[dict]:
    if cfg.rope_scaling == "default":
        return None
    return dict(rope_type=cfg.rope_scaling, factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)


def attention_mask(q_segments: Array, kv_segments: Array, q_pos_in_kv: Array) -> Array:
    """[B, 1, T, S] boolean: key j is visible to query i iff j <= i (causal, in cache slots),
    same segment, and not padding."""
    kv_index = jnp.arange(kv_segments.shape[-1])
    causal = kv_index[None, None, :] <= q_pos_in_kv[:, :, None]
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return (causal & same & (kv_segments[:, None, :] != 0))[:, None]


def embedding_scale(d_model: int, dtype) -> Array:
    """Gemma's embedding normaliser sqrt(d_model), rounded to the compute dtype first as transformers
    does (bfloat16: sqrt(2048) = 45.25..., applied as 45.25)."""
    return jnp.asarray(math.sqrt(d_model), dtype)


def window_mask(mask: Array, distance: Array, window: Array) -> Array:
    """mask [B, 1, T, S] & (distance [T, S] < window), window a scalar (0 = no window): with distance
    = query slot - key slot, a query sees itself and the window - 1 slots before it (Hugging Face's
    sliding window)."""
    return mask & ((distance < window) | (window == 0))[None, None]


def attention(q: Array, k: Array, v: Array, mask: Array, cache: Optional[tuple] = None, *,
              scale: Optional[float] = None, softcap: float = 0.0) -> Array:
    """Softmax attention, also over cached keys when `cache` is given (one joint softmax, with no
    concatenation of the cache: that would copy it).

    q [B, T, N, D]; k, v [B, T, K, D] with N = K * G (grouped-query); mask [B, 1, T, T] boolean.
    cache: (k_cache, v_cache, mask_cache) with k/v_cache [B, K, S, D] (the cache's layout: slots
    next to head_dim, so the dots read it without a transpose) and mask_cache [B, 1, T, S].
    scale: multiplies the queries (default D ** -0.5). softcap > 0: scores -> softcap * tanh(scores /
    softcap) before the mask (Gemma 2). Returns [B, T, N, D].

    The softmax is normalised after the value product (divide [B, T, N, D] by the row sums rather
    than the [B, N, T, S] probabilities) and its max is a stop_gradient shift: on CPU this is one
    pass over the score matrix less, forward and backward. A row with no visible key (padding)
    gets a finite uniform average, as with jax.nn.dot_product_attention.
    """
    b, t, n, d = q.shape
    kh = k.shape[2]
    out_dtype = q.dtype
    qg = (q * (d ** -0.5 if scale is None else scale)).reshape(b, t, kh, n // kh, d)
    if jax.default_backend() == "cpu" and q.dtype != jnp.float32:
        # XLA:CPU's library dot has no bfloat16 x bfloat16 -> float32 form (a runtime error at some shapes): the
        # dots take the same rounded inputs in float32 there, as the float32 accumulation asks anyway
        qg, k, v = (x.astype(jnp.float32) for x in (qg, k, v))
        cache = None if cache is None else (cache[0].astype(jnp.float32), cache[1].astype(jnp.float32), cache[2])
    parts = [(k, v, mask, "bskd")] + ([(*cache, "bksd")] if cache is not None else [])
    neg = jnp.finfo(jnp.float32).min

    def scores_of(kk, lay):
        x = jnp.einsum(f"btkgd,{lay}->bkgts", qg, kk, preferred_element_type=jnp.float32)
        return softcap * jnp.tanh(x / softcap) if softcap else x
    scores = [jnp.where(m[:, :, None], scores_of(kk, lay), neg) for kk, _, m, lay in parts]  # [B, K, G, T, S_part]
    shift = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [jnp.max(x, axis=-1, keepdims=True) for x in scores]))
    weights = [jnp.exp(x - shift) for x in scores]
    total = sum(jnp.sum(w, axis=-1) for w in weights)  # [B, K, G, T]
    out = sum(jnp.einsum(f"bkgts,{lay}->btkgd", w.astype(out_dtype).astype(vv.dtype), vv,
                         preferred_element_type=jnp.float32) for w, (_, vv, _, lay) in zip(weights, parts))
    return (out / total.transpose(0, 3, 1, 2)[..., None]).astype(out_dtype).reshape(b, t, n, d)


def causal_attention(q: Array, k: Array, v: Array, mask: Array, blocks: int = 1, **kw) -> Array:
    """`attention` for a causal mask, with the queries split into `blocks` equal blocks that each attend
    only to the keys up to their own end (the rest are masked anyway): (blocks + 1) / (2 * blocks) of
    the score work. One block when the length does not divide evenly. kw: scale, softcap."""
    t = q.shape[1]
    if blocks <= 1 or t % blocks:
        return attention(q, k, v, mask, **kw)
    h = t // blocks
    return jnp.concatenate([attention(q[:, i * h:(i + 1) * h], k[:, :(i + 1) * h], v[:, :(i + 1) * h],
                                      mask[:, :, i * h:(i + 1) * h, :(i + 1) * h], **kw) for i in range(blocks)],
                           axis=1)


class Proj(nn.Module):
    """x[..., *in_shape] @ kernel[*in_shape, *out_shape] (+ bias[*out_shape]), params float32.

    Used instead of nn.DenseGeneral so that kernels are created in their final rank: DenseGeneral
    reshapes a boxed kernel, which clashes with logical sharding constraints under a mesh.

    A frozen base may store the kernel quantised ('qkernel' + 'qscale', `quant.py`): it is dequantised here,
    one layer at a time inside the layer scan. LoRA (`lora`: (rank, scale, dropout)): + scale * drop(x) A B
    with A [*in, r] ~ N(0, 1/r) and B [r, *out] = 0, so a fresh adapter changes nothing; used whenever
    the params hold 'lora_a' / 'lora_b' (created by init), so params without them are the base model.
    """
    in_shape: tuple
    out_shape: tuple
    names: tuple
    use_bias: bool
    dtype: Any
    scale: float = 0.02
    lora: tuple = ()
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        xc = x.astype(self.dtype)

        def matmul(h, kernel):
            return jax.lax.dot_general(h, kernel.astype(self.dtype), (contract, ((), ())))
        if self.has_variable("params", "qkernel"):
            # a frozen quantised base: dequantised again in the backward pass, so no float32 copy of the
            # kernel is kept as a residual between the passes (that would cost more than the codes save)
            y = jax.checkpoint(lambda h, c, sc: matmul(h, quant.dequantize(c, sc)))(
                xc, self.get_variable("params", "qkernel"), self.get_variable("params", "qscale"))
        else:
            kernel = self.param("kernel", _init(self.names, self.scale), (*self.in_shape, *self.out_shape),
                                jnp.float32)
            y = (jax.checkpoint(matmul) if kernel.dtype != jnp.float32 else matmul)(xc, kernel)  # (a bf16 base)
        if self.lora and (self.is_initializing() or self.has_variable("params", "lora_a")):
            rank, scale, rate = self.lora
            a = self.param("lora_a", _init(self.names[:n_in] + ("lora",), 1.0 / rank), (*self.in_shape, rank),
                           jnp.float32)
            b = self.param("lora_b", _zeros(("lora",) + self.names[n_in:]), (rank, *self.out_shape), jnp.float32)
            h = nn.Dropout(rate, deterministic=self.deterministic)(xc) if rate else xc
            h = jax.lax.dot_general(h, a.astype(self.dtype), (contract, ((), ())))
            y = y + (scale * jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
                     ).astype(y.dtype)
        if self.use_bias:
            y = y + self.param("bias", _zeros(self.names[n_in:]), self.out_shape, jnp.float32).astype(self.dtype)
        return y


def _lora(cfg: ModelConfig, module: str) -> tuple:
    """Proj's `lora` argument for the projection `module` ('attn/query', ...): () when not adapted."""
    if not cfg.lora_rank or module not in lora_modules(cfg):
        return ()
    return cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout


class Attention(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, positions, mask, layer_cache, cache_index):
        cfg = self.cfg
        dt = cfg.compute_dtype
        bias = cfg.arch in LAYERNORM_ARCHS
        qkv_bias = bias or cfg.qkv_bias  # Qwen2: biases on q, k, v only
        out_scale = 0.02 / math.sqrt(2 * cfg.num_layers)  # GPT-2 scaled residual init

        def proj(name, heads, axis_name):
            return Proj((cfg.d_model,), (heads, cfg.head_dim), ("embed", axis_name, "head_dim"), qkv_bias, dt,
                        lora=_lora(cfg, f"attn/{name}"), deterministic=self.deterministic, name=name)(x)

        q = proj("query", cfg.num_heads, "heads")
        k = proj("key", cfg.num_kv_heads, "kv_heads")
        v = proj("value", cfg.num_kv_heads, "kv_heads")
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's dims, before RoPE
            q, k = Norm(cfg, name="q_norm")(q), Norm(cfg, name="k_norm")(k)
        if cfg.arch != "gpt":
            kw = dict(rotary_dim=cfg.rotary_dim, scaling=_rope_scaling(cfg))
            q, k = rope(q, positions, cfg.rope_theta, **kw), rope(k, positions, cfg.rope_theta, **kw)
        akw = dict(scale=cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None,
                   softcap=cfg.attn_softcap)

        if layer_cache is None:
            new_kv = None
            out = causal_attention(q, k, v, mask, cfg.causal_blocks, **akw)
        else:  # the cache is read here and written once for all layers by the caller
            cdt = layer_cache["k"].dtype
            k, v = k.astype(cdt).astype(dt), v.astype(cdt).astype(dt)  # as a later step will read them
            mask_cache, mask = mask
            cached = (layer_cache["k"].astype(dt), layer_cache["v"].astype(dt), mask_cache)
            out = attention(q, k, v, mask, None if mask_cache is None else cached, **akw)
            new_kv = {"k": k.transpose(0, 2, 1, 3).astype(cdt), "v": v.transpose(0, 2, 1, 3).astype(cdt)}
        out = Proj((cfg.num_heads, cfg.head_dim), (cfg.d_model,), ("heads", "head_dim", "embed"), bias, dt,
                   out_scale, lora=_lora(cfg, "attn/out"), deterministic=self.deterministic, name="out")(out)
        return out, new_kv


class Mlp(nn.Module):
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        out_scale = 0.02 / math.sqrt(2 * cfg.num_layers)
        act = ACTIVATIONS[cfg.activation]
        bias = cfg.arch in LAYERNORM_ARCHS

        def proj(name, d_in, d_out, names, scale=0.02):
            return Proj((d_in,), (d_out,), names, bias, cfg.compute_dtype, scale, lora=_lora(cfg, f"mlp/{name}"),
                        deterministic=self.deterministic, name=name)
        up = ("embed", "mlp")
        if bias:
            h = act(proj("wi", cfg.d_model, cfg.mlp_dim, up)(x))
        else:  # gated: SwiGLU (llama), GeGLU (Gemma, activation='gelu_tanh')
            h = act(proj("wi_gate", cfg.d_model, cfg.mlp_dim, up)(x)) * proj("wi_up", cfg.d_model, cfg.mlp_dim, up)(x)
        return proj("wo", cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), out_scale)(h)


class Block(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then x + drop(mlp(norm(x))).

    sandwich_norm (Gemma 2): attn and mlp outputs are normed again before the residual add.
    parallel_residual (GPT-NeoX): x + drop(attn(norm(x))) + drop(mlp(norm'(x))), both from the same x.
    window: this layer's sliding window (scanned; 0 = full attention), applied with `distances`
    (query slot - key slot: [T, T], or (cache part [T, S] or None, new part) with a cache).
    """
    cfg: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, layer_cache, window, positions, mask, distances, cache_index):
        cfg = self.cfg
        drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
        if window is not None:
            if isinstance(mask, tuple):
                mask = tuple(None if m is None else window_mask(m, d, window) for m, d in zip(mask, distances))
            else:
                mask = window_mask(mask, distances, window)
        h, new_kv = Attention(cfg, self.deterministic, name="attn")(Norm(cfg, name="ln_attn")(x), positions, mask,
                                                layer_cache, cache_index)
        if cfg.sandwich_norm:
            h = Norm(cfg, name="ln_post_attn")(h)

        def mlp(y):
            y = Mlp(cfg, self.deterministic, name="mlp")(Norm(cfg, name="ln_mlp")(y))
            return Norm(cfg, name="ln_post_mlp")(y) if cfg.sandwich_norm else y
        if cfg.parallel_residual:
            x = x + drop(h) + drop(mlp(x))
        else:
            x = x + drop(h)
            x = x + drop(mlp(x))
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x, new_kv


class Transformer(nn.Module):
    """Decoder-only transformer with an 'lm' or 'scalar' head (see module docstring)."""
    cfg: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic: bool = True,
                 cache: Optional[dict] = None, cache_index: Any = 0, last_only: bool = False,
                 last_n: int = 0, return_hidden: bool = False):
        cfg = self.cfg
        if self.head not in ("lm", "scalar"):
            raise ValueError(f"head={self.head!r}; valid: lm, scalar")
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed", dtype=cfg.compute_dtype,
                         embedding_init=_init(("vocab", "embed")))
        x = embed(tokens)
        if cfg.embed_scale:
            x = x * embedding_scale(cfg.d_model, x.dtype)
        if cfg.arch == "gpt":
            pos_table = self.param("pos_embed", _init(("length", "embed"), 0.01), (cfg.max_len, cfg.d_model), jnp.float32)
            x = x + jnp.take(pos_table, positions, axis=0).astype(x.dtype)
        x = nn.Dropout(cfg.dropout, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        windows, distances = None, None
        if cfg.sliding_window:
            windows = jnp.asarray(cfg.layer_windows, jnp.int32)  # [L], scanned with the layers
            distances = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # query slot - key slot
        if cache is None:
            layer_caches = None
            mask = attention_mask(segment_ids, segment_ids, jnp.broadcast_to(jnp.arange(t), (b, t)))
        else:
            kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, cache_index, axis=1)
            layer_caches = {"k": cache["k"], "v": cache["v"]}
            # (cached slots before cache_index, this call's own tokens): see `attention`.
            # Nothing is cached yet in a prefill at a static index 0: skip that part (XLA would
            # otherwise constant-fold its all-masked scores at length, slowly).
            if isinstance(cache_index, int) and cache_index == 0:
                mask_cache = None
            else:
                written = jnp.arange(cache["segment_ids"].shape[1]) < cache_index
                mask_cache = attention_mask(segment_ids, cache["segment_ids"], jnp.full((b, t), cache_index)) & written
            mask = (mask_cache, attention_mask(segment_ids, segment_ids, jnp.broadcast_to(jnp.arange(t), (b, t))))
            if windows is not None:
                slots = jnp.arange(cache["segment_ids"].shape[1])
                distances = (None if mask_cache is None else (cache_index + jnp.arange(t))[:, None] - slots[None, :],
                             distances)

        block = Block
        if REMAT_POLICIES[cfg.remat] is not None:
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers,
                        # Unrolling helps small training steps; it slowed the decode step down (measured).
                        unroll=cfg.scan_unroll if cache is None else 1,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, new_kv = stack(cfg, deterministic, name="layers")(x, layer_caches, windows, positions, mask, distances,
                                                             cache_index)
        if last_only or last_n:
            x = x[:, -(last_n or 1):]
        x = Norm(cfg, name="ln_final")(x)
        if return_hidden:  # the LM head applied later, over chunks of positions (`lm_head_logits`)
            return x

        if self.head == "lm":
            if cfg.tie_embeddings:
                out = embed.attend(x)
            else:
                out = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, name="lm_head",
                               kernel_init=_init(("embed", "vocab")))(x)
            if cfg.final_softcap:  # Gemma 2, in the compute dtype as transformers does
                out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
            out = nn.with_logical_constraint(out, ("act_batch", "act_length", "act_vocab"))
        else:  # scalar head, N(0, 1/sqrt(d_model + 1)) as in the paper's reward model
            out = nn.Dense(1, dtype=jnp.float32, name="scalar_head",
                           kernel_init=_init(("embed", None), 1.0 / math.sqrt(cfg.d_model + 1)),
                           bias_init=_zeros((None,)))(x.astype(jnp.float32))[..., 0]
        if cache is None:
            return out
        start = (0, 0, 0, cache_index, 0)  # every layer's new slots in one in-place write
        return out, {"k": jax.lax.dynamic_update_slice(cache["k"], new_kv["k"], start),
                     "v": jax.lax.dynamic_update_slice(cache["v"], new_kv["v"], start),
                     "segment_ids": kv_segments}


def lm_head_logits(params, cfg: ModelConfig, x):
    """The LM head of `Transformer(cfg)` as a pure function of its params: final hidden states x [..., D]
    (`return_hidden=True`) -> logits [..., V], computed exactly as the module computes them (the tied
    embedding or `lm_head`, in the compute dtype, then Gemma 2's soft-cap)."""
    dt = cfg.compute_dtype
    if cfg.tie_embeddings:
        out = jnp.dot(x.astype(dt), jnp.asarray(nn.unbox(params["embed"]["embedding"])).astype(dt).T)
    else:
        kernel = jnp.asarray(nn.unbox(params["lm_head"]["kernel"])).astype(dt)
        out = jax.lax.dot_general(x.astype(dt), kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if cfg.final_softcap:
        out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
    return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """Empty KV cache for `length` slots: k, v [layers, B, kv_heads, S, head_dim], segment_ids [B, S]."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, length), jnp.int32)}


CACHE_LOGICAL_AXES = {"k": ("layers", "act_batch", "act_kv_heads", "act_length", None),
                      "v": ("layers", "act_batch", "act_kv_heads", "act_length", None),
                      "segment_ids": ("act_batch", "act_length")}


def param_count(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
