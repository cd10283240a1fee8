"""Hugging Face checkpoints <-> our params: GPT-2, Llama (incl. Llama-3 RoPE scaling), Mistral, Qwen2 /
Qwen2.5, Qwen3, Gemma, Gemma 2 and GPT-NeoX (Pythia), all as the one `Transformer` with config keys.

    model, params = hf.load_pretrained("/path/to/hf_dir", mesh=mesh)  # config.json + *.safetensors
    logits = model.apply({"params": params}, tokens)                  # [B, T, V]
    hf.save_pretrained(model, params, "/path/out")                    # transformers loads it

Safetensors files are read as numpy memory maps (the format is an 8-byte header length, a JSON
header, then raw little-endian tensors): bfloat16 works without torch, and each device's shard is
copied from the page cache straight into its sharding, so the host never holds a second full copy
of the model. Pickle checkpoints (.bin, .pt) are refused, never unpickled.

Layouts: GPT-2's Conv1D weights are already [in, out] (c_attn fuses q|k|v on the last axis);
torch nn.Linear weights (the others) are [out, in], i.e. ours transposed; GPT-NeoX fuses q|k|v per
head (rows ordered head, then q|k|v, then head_dim). Our RoPE uses the Hugging Face
'rotate half' layout, so HF LLaMA q/k weights map without permutation (Meta's original
interleaved checkpoints would need the q/k rows permuted: convert them with transformers first).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from instructgpt_jax import sharding
from instructgpt_jax.models.transformer import ModelConfig, Transformer

class Family(NamedTuple):
    arch: str     # our ModelConfig.arch
    prefix: str   # HF base-model prefix inside *ForCausalLM
    head: str     # HF name of the untied LM head
    lm: str       # *ForCausalLM class
    base: str     # base model class (AutoModel)
    seq: str      # *ForSequenceClassification class (a reward model's export: trunk + bias-free `score`)


# HF model_type -> family. Every llama-arch family shares LLaMA's tensor names (plus its extra tensors).
FAMILIES = {
    "gpt2": Family("gpt", "transformer.", "lm_head.weight", "GPT2LMHeadModel", "GPT2Model",
                   "GPT2ForSequenceClassification"),
    "llama": Family("llama", "model.", "lm_head.weight", "LlamaForCausalLM", "LlamaModel",
                    "LlamaForSequenceClassification"),
    "mistral": Family("llama", "model.", "lm_head.weight", "MistralForCausalLM", "MistralModel",
                      "MistralForSequenceClassification"),
    "qwen2": Family("llama", "model.", "lm_head.weight", "Qwen2ForCausalLM", "Qwen2Model",
                    "Qwen2ForSequenceClassification"),
    "qwen3": Family("llama", "model.", "lm_head.weight", "Qwen3ForCausalLM", "Qwen3Model",
                    "Qwen3ForSequenceClassification"),
    "gemma": Family("llama", "model.", "lm_head.weight", "GemmaForCausalLM", "GemmaModel",
                    "GemmaForSequenceClassification"),
    "gemma2": Family("llama", "model.", "lm_head.weight", "Gemma2ForCausalLM", "Gemma2Model",
                     "Gemma2ForSequenceClassification"),
    "gpt_neox": Family("neox", "gpt_neox.", "embed_out.weight", "GPTNeoXForCausalLM", "GPTNeoXModel",
                       "GPTNeoXForSequenceClassification"),
}
SUPPORTED = tuple(name for f in FAMILIES.values() for name in (f.lm, f.base, f.seq))
_PREFIX = {f.arch: f.prefix for f in FAMILIES.values()}
_HEAD = {f.arch: f.head for f in FAMILIES.values()}
# HF buffers that are not weights: GPT-2's and GPT-NeoX's causal-mask buffers, old rotary caches.
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
                      r"|gpt_neox\.layers\.\d+\.attention\.((masked_)?bias|rotary_emb\.inv_freq)")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
SCORE_FILE = "score_head.safetensors"
# HF activation names -> ours (config.model.activation); GPT-2's 'gelu_new' is the tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu",
                "swish": "silu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "silu": "silu"}
# Family keys of config.model and their plain GPT-3 / LLaMA values (what model_config_dict returns
# unless the checkpoint says otherwise, so that config.model.update() also resets a preset's keys).
FAMILY_DEFAULTS = dict(qkv_bias=False, qk_norm=False, norm_unit_offset=False, embed_scale=False, sandwich_norm=False,
                       parallel_residual=False, rotary_pct=1.0, rope_scaling="default", rope_factor=1.0,
                       rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
                       query_pre_attn_scalar=0.0, attn_softcap=0.0, final_softcap=0.0, sliding_window=0,
                       sliding_pattern="S")


# --------------------------------------------------------------------------- config


def _read_config(path) -> dict:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face model directory)")
    return json.loads(file.read_text())


def _pattern(layer_types: list) -> str:
    """HF layer_types ['sliding_attention', 'full_attention', ...] -> our shortest repeating 'S'/'F' pattern."""
    valid = {"sliding_attention": "S", "full_attention": "F"}
    bad = [t for t in layer_types if t not in valid]
    if bad:
        raise ValueError(f"config.json: layer_types entry {bad[0]!r} is not supported; valid: {', '.join(valid)}")
    full = "".join(valid[t] for t in layer_types)
    return next(full[:n] for n in range(1, len(full) + 1) if (full[:n] * len(full))[:len(full)] == full)


def _rope_keys(c: dict, default_theta: float = 10000.0) -> dict:
    """RoPE keys from either spelling: transformers >= 5 `rope_parameters`, older `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    rope = dict(c.get(key) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"config.json: {key}.rope_type={kind!r} is not supported; valid: default, llama3")
    out = dict(rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or default_theta), rope_scaling=kind)
    if kind == "llama3":
        out.update(rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_len=int(rope["original_max_position_embeddings"]))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial is not None:
        out["rotary_pct"] = float(partial)
    return out


def _activation(c: dict, key: str, default: str, gemma: bool = False) -> str:
    name = c.get(key) or default
    if gemma and name == "gelu":  # legacy Gemma configs: 'gelu' means the tanh approximation (transformers too)
        name = "gelu_pytorch_tanh"
    if name not in _ACTIVATIONS:
        raise ValueError(f"config.json: {key}={name!r} is not supported; valid: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def model_config_dict(hf_config) -> dict:
    """`config.model` keys (see config_lib.model_config) from an HF config.json dict, file or directory.

    Only the keys a checkpoint determines (shapes and every family key, defaults included);
    `config.model.update(...)` keeps dropout, dtype, remat, etc.
    """
    c = hf_config if isinstance(hf_config, dict) else _read_config(hf_config)
    archs, model_type = c.get("architectures") or [], c.get("model_type")
    bad = [a for a in archs if a not in SUPPORTED]
    if bad or model_type not in FAMILIES:
        raise ValueError(f"unsupported Hugging Face architecture {bad[0] if bad else model_type!r} "
                         f"(model_type {model_type!r}); supported: {', '.join(SUPPORTED)}")

    def require(key, ok, default=None):
        if c.get(key, default) not in ok:
            raise ValueError(f"config.json: {key}={c.get(key, default)!r} is not supported; valid: "
                             f"{', '.join(map(repr, ok))}")

    out = dict(FAMILY_DEFAULTS)
    if model_type == "gpt2":
        require("scale_attn_weights", (True,), True)
        require("scale_attn_by_inverse_layer_idx", (False,), False)
        require("add_cross_attention", (False,), False)
        d, heads = c["n_embd"], c["n_head"]
        return out | dict(arch="gpt", vocab_size=c["vocab_size"], num_layers=c["n_layer"], d_model=d,
                          num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                          mlp_dim=c.get("n_inner") or 4 * d, max_len=c["n_positions"],
                          tie_embeddings=c.get("tie_word_embeddings", True), norm_eps=c.get("layer_norm_epsilon", 1e-5),
                          rope_theta=10000.0, activation=_activation(c, "activation_function", "gelu_new"))

    d, heads = c["hidden_size"], c["num_attention_heads"]
    if model_type == "gpt_neox":
        require("attention_bias", (True,), True)
        rope = _rope_keys(c, float(c.get("rotary_emb_base") or 10000.0))
        rope.setdefault("rotary_pct", float(c.get("rotary_pct", 0.25)))  # transformers' default too
        return out | rope | dict(
            arch="neox", vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], d_model=d, num_heads=heads,
            num_kv_heads=heads, head_dim=d // heads, mlp_dim=c["intermediate_size"],
            max_len=c["max_position_embeddings"], tie_embeddings=c.get("tie_word_embeddings", False),
            norm_eps=c.get("layer_norm_eps", 1e-5), activation=_activation(c, "hidden_act", "gelu"),
            parallel_residual=c.get("use_parallel_residual", True))

    # LLaMA-shaped families
    gemma = model_type in ("gemma", "gemma2")
    require("mlp_bias", (False,), False)
    if model_type != "qwen2":  # Qwen2's q/k/v biases are implied by its model_type
        require("attention_bias", (False,), False)
    rope = _rope_keys(c)
    if rope.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(f"config.json: partial_rotary_factor={rope['rotary_pct']} is not supported for "
                         f"model_type {model_type!r}; valid: 1.0")
    out |= rope | dict(
        arch="llama", vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], d_model=d, num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or d // heads,
        mlp_dim=c["intermediate_size"], max_len=c["max_position_embeddings"],
        tie_embeddings=c.get("tie_word_embeddings", gemma), norm_eps=c.get("rms_norm_eps", 1e-6),
        activation=_activation(c, "hidden_activation" if model_type == "gemma2" else "hidden_act",
                               "gelu_pytorch_tanh" if gemma else "silu", gemma=model_type == "gemma"),
        qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3", norm_unit_offset=gemma, embed_scale=gemma)

    window, layer_types = c.get("sliding_window"), c.get("layer_types")
    if model_type == "mistral":
        layer_types = None if not window else ["sliding_attention"] * out["num_layers"]
    elif model_type in ("qwen2", "qwen3"):
        if not c.get("use_sliding_window", False):
            window, layer_types = None, None
        elif layer_types is None:  # transformers' rule: layers from max_window_layers on slide
            k = c.get("max_window_layers", out["num_layers"])
            layer_types = ["full_attention" if i < k else "sliding_attention" for i in range(out["num_layers"])]
    elif model_type == "gemma2":
        window = c.get("sliding_window", 4096)
        if layer_types is None:  # transformers' rule: even layers (0, 2, ...) slide
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(out["num_layers"])]
        out.update(sandwich_norm=True, attn_softcap=float(c.get("attn_logit_softcapping") or 0.0),
                   final_softcap=float(c.get("final_logit_softcapping") or 0.0),
                   query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)))
    else:
        layer_types = None
    if layer_types and window:
        if len(layer_types) != out["num_layers"]:
            raise ValueError(f"config.json: layer_types has {len(layer_types)} entries for num_hidden_layers="
                             f"{out['num_layers']}")
        pattern = _pattern(layer_types)
        if "S" in pattern:
            out.update(sliding_window=int(window), sliding_pattern=pattern)
    return out


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type that computes what `cfg` does (ValueError naming the key if none does)."""
    if cfg.arch == "gpt":
        family = "gpt2"
    elif cfg.arch == "neox":
        family = "gpt_neox"
    elif cfg.sandwich_norm:
        family = "gemma2"
    elif cfg.norm_unit_offset:
        family = "gemma"
    elif cfg.qk_norm:
        family = "qwen3"
    elif cfg.qkv_bias:
        family = "qwen2"
    elif cfg.sliding_window:
        family = "mistral"
    else:
        family = "llama"
    # family -> the keys it can differ from FAMILY_DEFAULTS in, with the values it needs where fixed
    # (sliding_pattern only matters with a sliding_window)
    free = {"rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len",
            "sliding_pattern"}
    gemma = dict(norm_unit_offset=True, embed_scale=True)
    allowed = {"gpt2": ({"sliding_pattern"}, {}), "llama": (free, {}), "mistral": (free | {"sliding_window"}, {}),
               "qwen2": (free | {"sliding_window"}, dict(qkv_bias=True)),
               "qwen3": (free | {"sliding_window"}, dict(qk_norm=True)),
               "gemma": (free, gemma),
               "gemma2": (free | {"sliding_window", "attn_softcap", "final_softcap", "query_pre_attn_scalar"},
                          dict(gemma, sandwich_norm=True)),
               "gpt_neox": (free | {"rotary_pct", "parallel_residual"}, {})}[family]
    for key, default in FAMILY_DEFAULTS.items():
        want = allowed[1].get(key, default)
        if key not in allowed[0] and getattr(cfg, key) != want:
            raise ValueError(f"config.model.{key}={getattr(cfg, key)!r} has no Hugging Face {family!r} equivalent "
                             f"(export needs {want!r} there)")
    if family == "mistral" and cfg.sliding_pattern.strip("S"):
        raise ValueError(f"config.model.sliding_pattern={cfg.sliding_pattern!r}: Mistral slides on every layer "
                         f"(only 'S' exports)")
    if family in ("gpt2", "gpt_neox") and (cfg.num_kv_heads != cfg.num_heads
                                           or cfg.num_heads * cfg.head_dim != cfg.d_model):
        raise ValueError(f"{family} export needs num_kv_heads == num_heads and num_heads * head_dim == d_model")
    if family == "gemma" and cfg.activation != "gelu_tanh":
        raise ValueError(f"config.model.activation={cfg.activation!r}: Gemma export needs 'gelu_tanh'")
    return family


def _rope_parameters(cfg: ModelConfig) -> dict:
    rope = dict(rope_type=cfg.rope_scaling, rope_theta=cfg.rope_theta)
    if cfg.rope_scaling == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    if cfg.rotary_pct != 1.0:
        rope["partial_rotary_factor"] = cfg.rotary_pct
    return rope


def _hf_config(cfg: ModelConfig, kind: str, dtype) -> dict:
    """config.json for transformers from our ModelConfig; kind: 'lm', 'base' or 'seq' (one-label
    sequence classification: a reward model)."""
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]
    model_type = hf_model_type(cfg)
    family = FAMILIES[model_type]
    head = dict(architectures=[getattr(family, kind)], model_type=model_type)
    if kind == "seq":
        head.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, torch_dtype=dtype)
    act = _HF_ACTIVATION[cfg.activation]
    if model_type == "gpt2":
        return head | common | dict(
            n_layer=cfg.num_layers, n_embd=cfg.d_model, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
            n_positions=cfg.max_len, n_ctx=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new" if cfg.activation == "gelu_tanh" else act,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0)
    rope = _rope_parameters(cfg)
    shapes = dict(num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
                  intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len,
                  # both spellings: transformers < 5 reads rope_theta (+ rope_scaling), >= 5 rope_parameters
                  rope_theta=cfg.rope_theta, rope_parameters=rope)
    if cfg.rope_scaling != "default":
        shapes["rope_scaling"] = rope
    if model_type == "gpt_neox":
        return head | common | shapes | dict(
            hidden_act=act, layer_norm_eps=cfg.norm_eps, use_parallel_residual=cfg.parallel_residual,
            rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rope_theta, attention_bias=True,
            hidden_dropout=cfg.dropout, attention_dropout=0.0)
    out = head | common | shapes | dict(
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, hidden_act=act,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    layer_types = ["sliding_attention" if w else "full_attention" for w in cfg.layer_windows]
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif model_type in ("qwen2", "qwen3"):
        if model_type == "qwen2":  # its q/k/v biases come with the model_type, not a key
            del out["attention_bias"]
        sliding = bool(cfg.sliding_window)
        out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window if sliding else None,
                   max_window_layers=layer_types.index("sliding_attention") if sliding else cfg.num_layers,
                   layer_types=layer_types if sliding else ["full_attention"] * cfg.num_layers)
    elif model_type == "gemma2":
        # with no window every layer is 'full_attention'; transformers still wants a window size
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        out.update(hidden_activation=act,  # transformers validates this one as an int
                   query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                   attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None,
                   sliding_window=cfg.sliding_window or cfg.max_len,
                   layer_types=layer_types if cfg.sliding_window else ["full_attention"] * cfg.num_layers)
    return out


# --------------------------------------------------------------------------- the name/layout table


class _Spec(NamedTuple):
    ours: tuple   # our param paths; several = fused into one HF tensor along its last axis
    hf: str       # HF tensor name; '{i}' = one tensor per layer, stacked on our leading layer axis
    shape: tuple  # the HF tensor's shape
    kind: str     # 'copy' (same layout), 'linear' (torch [out, in] = ours transposed), 'split' (fused on the
                  # last axis), 'heads_qkv' (torch [heads * (q|k|v) * head_dim, in] fused per head: GPT-NeoX)


def _specs(cfg: ModelConfig, head: str) -> list[_Spec]:
    d, h, kv, dh, m, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    S = _Spec

    def ln(ours, hf):  # LayerNorm with bias (gpt, neox)
        return [S((f"{ours}/LayerNorm_0/scale",), f"{hf}.weight", (d,), "copy"),
                S((f"{ours}/LayerNorm_0/bias",), f"{hf}.bias", (d,), "copy")]
    if cfg.arch == "gpt":
        a, qkv = "transformer.h.{i}.attn.", [f"layers/attn/{n}/" for n in ("query", "key", "value")]
        specs = [S(("embed/embedding",), "transformer.wte.weight", (v, d), "copy"),
                 S(("pos_embed",), "transformer.wpe.weight", (cfg.max_len, d), "copy"),
                 *ln("layers/ln_attn", "transformer.h.{i}.ln_1"),
                 S(tuple(p + "kernel" for p in qkv), a + "c_attn.weight", (d, 3 * h * dh), "split"),
                 S(tuple(p + "bias" for p in qkv), a + "c_attn.bias", (3 * h * dh,), "split"),
                 S(("layers/attn/out/kernel",), a + "c_proj.weight", (h * dh, d), "copy"),
                 S(("layers/attn/out/bias",), a + "c_proj.bias", (d,), "copy"),
                 *ln("layers/ln_mlp", "transformer.h.{i}.ln_2"),
                 S(("layers/mlp/wi/kernel",), "transformer.h.{i}.mlp.c_fc.weight", (d, m), "copy"),
                 S(("layers/mlp/wi/bias",), "transformer.h.{i}.mlp.c_fc.bias", (m,), "copy"),
                 S(("layers/mlp/wo/kernel",), "transformer.h.{i}.mlp.c_proj.weight", (m, d), "copy"),
                 S(("layers/mlp/wo/bias",), "transformer.h.{i}.mlp.c_proj.bias", (d,), "copy"),
                 *ln("ln_final", "transformer.ln_f")]
    elif cfg.arch == "neox":  # fused query_key_value, per head [q | k | v] (see _from_hf 'heads_qkv')
        L, qkv = "gpt_neox.layers.{i}.", [f"layers/attn/{n}/" for n in ("query", "key", "value")]
        specs = [S(("embed/embedding",), "gpt_neox.embed_in.weight", (v, d), "copy"),
                 *ln("layers/ln_attn", L + "input_layernorm"),
                 S(tuple(p + "kernel" for p in qkv), L + "attention.query_key_value.weight", (3 * h * dh, d),
                   "heads_qkv"),
                 S(tuple(p + "bias" for p in qkv), L + "attention.query_key_value.bias", (3 * h * dh,), "heads_qkv"),
                 S(("layers/attn/out/kernel",), L + "attention.dense.weight", (d, h * dh), "linear"),
                 S(("layers/attn/out/bias",), L + "attention.dense.bias", (d,), "copy"),
                 *ln("layers/ln_mlp", L + "post_attention_layernorm"),
                 S(("layers/mlp/wi/kernel",), L + "mlp.dense_h_to_4h.weight", (m, d), "linear"),
                 S(("layers/mlp/wi/bias",), L + "mlp.dense_h_to_4h.bias", (m,), "copy"),
                 S(("layers/mlp/wo/kernel",), L + "mlp.dense_4h_to_h.weight", (d, m), "linear"),
                 S(("layers/mlp/wo/bias",), L + "mlp.dense_4h_to_h.bias", (d,), "copy"),
                 *ln("ln_final", "gpt_neox.final_layer_norm")]
    else:
        L, a, f = "model.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
        # Gemma 2 names its four norms input / post_attention / pre_feedforward / post_feedforward;
        # the others' post_attention_layernorm is the norm before the MLP.
        specs = [S(("embed/embedding",), "model.embed_tokens.weight", (v, d), "copy"),
                 S(("layers/ln_attn/scale",), L + "input_layernorm.weight", (d,), "copy"),
                 S(("layers/attn/query/kernel",), a + "q_proj.weight", (h * dh, d), "linear"),
                 S(("layers/attn/key/kernel",), a + "k_proj.weight", (kv * dh, d), "linear"),
                 S(("layers/attn/value/kernel",), a + "v_proj.weight", (kv * dh, d), "linear"),
                 S(("layers/attn/out/kernel",), a + "o_proj.weight", (d, h * dh), "linear"),
                 S(("layers/mlp/wi_gate/kernel",), f + "gate_proj.weight", (m, d), "linear"),
                 S(("layers/mlp/wi_up/kernel",), f + "up_proj.weight", (m, d), "linear"),
                 S(("layers/mlp/wo/kernel",), f + "down_proj.weight", (d, m), "linear"),
                 S(("ln_final/scale",), "model.norm.weight", (d,), "copy")]
        if cfg.sandwich_norm:
            specs += [S(("layers/ln_post_attn/scale",), L + "post_attention_layernorm.weight", (d,), "copy"),
                      S(("layers/ln_mlp/scale",), L + "pre_feedforward_layernorm.weight", (d,), "copy"),
                      S(("layers/ln_post_mlp/scale",), L + "post_feedforward_layernorm.weight", (d,), "copy")]
        else:
            specs.append(S(("layers/ln_mlp/scale",), L + "post_attention_layernorm.weight", (d,), "copy"))
        if cfg.qkv_bias:
            specs += [S(("layers/attn/query/bias",), a + "q_proj.bias", (h * dh,), "copy"),
                      S(("layers/attn/key/bias",), a + "k_proj.bias", (kv * dh,), "copy"),
                      S(("layers/attn/value/bias",), a + "v_proj.bias", (kv * dh,), "copy")]
        if cfg.qk_norm:
            specs += [S(("layers/attn/q_norm/scale",), a + "q_norm.weight", (dh,), "copy"),
                      S(("layers/attn/k_norm/scale",), a + "k_norm.weight", (dh,), "copy")]
    if head == "lm" and not cfg.tie_embeddings:
        specs.append(S(("lm_head/kernel",), _HEAD[cfg.arch], (v, d), "linear"))
    if head == "scalar":  # stored apart from the trunk, in SCORE_FILE, as torch Linear(d, 1)
        specs += [S(("scalar_head/kernel",), "score.weight", (1, d), "linear"),
                  S(("scalar_head/bias",), "score.bias", (1,), "copy")]
    return specs


def _from_hf(spec: _Spec, a: np.ndarray, j: int, shape: tuple) -> np.ndarray:
    """HF tensor -> our param (one layer) number j of the spec; views only, no copies of a memmap."""
    if spec.kind == "linear":
        a = a.T
    elif spec.kind == "split":
        a = np.split(a, len(spec.ours), axis=-1)[j]
    elif spec.kind == "heads_qkv":  # rows (head, q|k|v, head_dim); ours [in, heads, head_dim] or [heads, head_dim]
        heads, dh = shape[-2:]
        a = a.reshape(heads, 3, dh, *a.shape[1:])[:, j]
        a = np.moveaxis(a, -1, 0) if a.ndim == 3 else a
    return a.reshape(shape)


def _to_hf(spec: _Spec, xs: list) -> np.ndarray:
    if spec.kind == "linear":
        return xs[0].reshape(spec.shape[::-1]).T
    if spec.kind == "split":
        return np.concatenate([x.reshape(spec.shape[:-1] + (-1,)) for x in xs], axis=-1)
    if spec.kind == "heads_qkv":  # [in, heads, 3, head_dim] -> [heads * 3 * head_dim, in] (bias: no 'in')
        fused = np.stack(xs, axis=-2)
        return fused.reshape(spec.shape) if fused.ndim == 3 else fused.reshape(fused.shape[0], -1).T
    return xs[0].reshape(spec.shape)


def _hf_names(spec: _Spec, num_layers: int) -> list:
    return [spec.hf.format(i=i) for i in range(num_layers)] if "{i}" in spec.hf else [spec.hf]


def _check_table(specs, shapes: dict):
    """Guard against models/transformer.py renaming params without this table following."""
    mapped = {p for s in specs for p in s.ours}
    if mapped != set(shapes):
        raise RuntimeError(f"hf.py's name table is out of date with models/transformer.py: unmapped params "
                           f"{sorted(set(shapes) - mapped)}, mapped but absent {sorted(mapped - set(shapes))}")


# --------------------------------------------------------------------------- safetensors I/O


def _memmap_safetensors(file: Path) -> dict:
    """name -> read-only numpy view of the tensor in the memory-mapped file (nothing read yet)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    data = np.memmap(file, np.uint8, "r", offset=8 + n) if os.path.getsize(file) > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def _checkpoint_tensors(path: Path, arch: str, head: str) -> dict:
    """Canonical HF name (e.g. 'transformer.h.0.ln_1.weight') -> lazy numpy view, over all shards."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ValueError(
                f"{path}: only pickle checkpoints ({', '.join(pickles)}), which are never unpickled here (loading "
                f"one can run arbitrary code). Convert to safetensors first: transformers.AutoModelForCausalLM"
                f".from_pretrained(path).save_pretrained(out, safe_serialization=True)")
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(_memmap_safetensors(path / name))
    prefix, lm_head = _PREFIX[arch], _HEAD[arch]
    if not any(k.startswith(prefix) for k in tensors):  # a base model (GPT2Model, LlamaModel, ...) checkpoint
        tensors = {k if k == lm_head else prefix + k: t for k, t in tensors.items()}
    if head == "scalar":
        if not (path / SCORE_FILE).exists():
            raise FileNotFoundError(f"{path}: head='scalar' needs {SCORE_FILE} (written by "
                                    f"save_pretrained(..., trunk_only=True))")
        tensors.update(_memmap_safetensors(path / SCORE_FILE))
    return tensors


def _write_safetensors(file: Path, items: list, fetch, write: bool):
    """Stream tensors to a safetensors file one at a time; items = [(name, shape, dtype)], and
    fetch(k) returns item k's array. Every process runs fetch (it may gather); only `write` ones write."""
    header, offset = {}, 0
    for name, shape, dtype in items:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = dict(dtype=_ST_NAMES[np.dtype(dtype)], shape=list(shape), data_offsets=[offset, offset + size])
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    with open(file, "wb") if write else contextlib.nullcontext() as f:
        if write:
            f.write(len(blob).to_bytes(8, "little") + blob)
        for k, (_, shape, dtype) in enumerate(items):
            a = fetch(k)
            assert a.shape == tuple(shape) and a.dtype == dtype, (items[k], a.shape, a.dtype)
            if write:
                f.write(np.ascontiguousarray(a).tobytes())


# --------------------------------------------------------------------------- load / save


def load_pretrained(path, *, mesh=None, dtype="float32", head: str = "lm"):
    """(model, params) from a local Hugging Face directory (config.json + safetensors, one file or sharded).

    mesh: params are placed straight into their `sharding` shardings on it (default: one device).
    dtype: dtype of the returned params and the model's compute dtype.
    head: 'lm', or 'scalar' for a directory written by save_pretrained(..., trunk_only=True).
    """
    path = Path(path)
    cfg = ModelConfig(**model_config_dict(path), dtype=str(jnp.dtype(dtype)))
    model = Transformer(cfg, head=head)
    tensors = _checkpoint_tensors(path, cfg.arch, head)
    specs = _specs(cfg, head)

    expected = {n: s.shape for s in specs for n in _hf_names(s, cfg.num_layers)}
    ignored = lambda k: _IGNORED.fullmatch(k) or (k == _HEAD[cfg.arch] and (cfg.tie_embeddings or head != "lm"))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(k for k in set(tensors) - set(expected) if not ignored(k))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match its config.json: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape} "
                             f"from config.json")

    if mesh is None:
        mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    shapes, shardings = sharding.param_shardings(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32)), mesh)
    shapes = traverse_util.flatten_dict(shapes["params"], sep="/")
    shardings = traverse_util.flatten_dict(shardings["params"], sep="/")
    _check_table(specs, shapes)
    dt = jnp.dtype(dtype)

    def load(spec, j, p):
        shape = shapes[p].shape
        if "{i}" not in spec.hf:
            return jax.make_array_from_callback(  # np.array copies just this device's slice
                shape, shardings[p], lambda idx: np.array(_from_hf(spec, tensors[spec.hf], j, shape)[idx], dt))

        def layers(idx):  # idx[0] picks layers, the rest slices within a layer
            return np.stack([np.asarray(_from_hf(spec, tensors[spec.hf.format(i=i)], j, shape[1:])[idx[1:]], dt)
                             for i in range(shape[0])[idx[0]]])
        return jax.make_array_from_callback(shape, shardings[p], layers)

    params = {p: load(s, j, p) for s in specs for j, p in enumerate(s.ours)}
    return model, traverse_util.unflatten_dict(params, sep="/")


def save_pretrained(model: Transformer, params, path, *, trunk_only: bool = False, classifier: bool = False,
                    extra_config: dict | None = None):
    """Write config.json + model.safetensors that transformers loads.

    LM models -> AutoModelForCausalLM (the family's *ForCausalLM, see `hf_model_type`).
    Scalar-head (reward / value) models need trunk_only=True or classifier=True. classifier=True ->
    AutoModelForSequenceClassification (the family's *ForSequenceClassification, num_labels 1):
    the trunk plus the head's weight as the bias-free
    `score` [1, d_model]; the head's own bias has no place there, so it goes (with the weight) in
    score_head.safetensors as torch Linear(d_model, 1) tensors 'score.weight', 'score.bias', which
    `load_pretrained(path, head='scalar')` reads. transformers' reward = logits[:, 0] + score.bias.
    trunk_only=True writes the base model (AutoModel: GPT2Model, LlamaModel, ...) and, for a
    scalar-head model, its head in score_head.safetensors only.
    extra_config: keys added to config.json (token ids, a reward model's bias, ...).
    Call it on every process (params are gathered tensor by tensor); process 0 writes.
    """
    params = nn.unbox(params)  # also accept model.init(...) output, boxed with logical axes
    if set(params) == {"params"}:
        params = params["params"]
    if model.head == "scalar" and not (trunk_only or classifier):
        raise ValueError("a scalar-head (reward / value) model has no transformers LM equivalent; pass "
                         "classifier=True (a *ForSequenceClassification) or trunk_only=True (the base model plus "
                         "its head in " + SCORE_FILE + ")")
    if classifier and (trunk_only or model.head != "scalar"):
        raise ValueError("classifier=True needs a scalar-head model and trunk_only=False")
    cfg, path = model.cfg, Path(path)
    kind = "base" if trunk_only else "seq" if classifier else "lm"
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = _specs(cfg, model.head)
    _check_table(specs, flat)
    write = jax.process_index() == 0
    if write:
        path.mkdir(parents=True, exist_ok=True)
        dtype = flat["embed/embedding"].dtype
        config = _hf_config(cfg, kind, dtype) | dict(extra_config or {})
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    prefix, lm_head = _PREFIX[cfg.arch], _HEAD[cfg.arch]
    score = [s for s in specs if s.hf.startswith("score.")]
    files = {"model.safetensors": [s for s in specs if s not in score and (s.hf != lm_head or kind == "lm")]
             + [s for s in score if kind == "seq" and s.hf == "score.weight"],
             SCORE_FILE: score}
    for file, file_specs in files.items():
        if not file_specs:
            continue
        # (HF name, spec, layer or None); a base model's names have no 'transformer.' / 'model.' prefix
        items = [(n.removeprefix(prefix) if trunk_only else n, s, i if "{i}" in s.hf else None)
                 for s in file_specs for i, n in enumerate(_hf_names(s, cfg.num_layers))]
        host = {}

        def fetch(k):
            _, spec, i = items[k]
            if spec not in host:  # gather one spec's params at a time (all processes take part)
                host.clear()
                host[spec] = [np.asarray(sharding.to_host(flat[p])) for p in spec.ours]
            return _to_hf(spec, [x if i is None else x[i] for x in host[spec]])

        _write_safetensors(path / file, [(n, s.shape, flat[s.ours[0]].dtype) for n, s, _ in items], fetch, write)


# --------------------------------------------------------------------------- PEFT LoRA adapters

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _peft_modules(cfg: ModelConfig) -> dict:
    """Our adapted projection ('attn/query', ...) -> its spec in the name table (one HF module per layer).
    Fused HF modules (GPT-2's c_attn, GPT-NeoX's query_key_value) hold several of our projections: a PEFT
    adapter on them is not one of ours, so q / k / v adapters of those families have no PEFT form."""
    from instructgpt_jax.models.transformer import lora_modules
    by_path = {s.ours[0]: s for s in _specs(cfg, "lm") if "{i}" in s.hf}
    out = {}
    for module in lora_modules(cfg):
        spec = by_path.get(f"layers/{module}/kernel")
        if spec is None or len(spec.ours) != 1 or spec.kind not in ("linear", "copy"):
            raise ValueError(f"LoRA on {module} of a {hf_model_type(cfg)} model has no PEFT equivalent (the "
                             f"Hugging Face module fuses q, k and v); export the merged weights instead, or train "
                             f"with config.lora.targets without q, k, v")
        out[module] = spec
    return out


def _peft_name(spec, i: int, which: str) -> str:
    return f"base_model.model.{spec.hf.format(i=i).removesuffix('.weight')}.lora_{which}.weight"


def save_peft_adapter(cfg: ModelConfig, adapter: dict, path, *, base: str = "", dropout: float = 0.0) -> dict:
    """A LoRA model's adapters (`cfg` with lora_*; `adapter` the 'lora_a' / 'lora_b' tree) -> a PEFT adapter
    directory: adapter_config.json + adapter_model.safetensors (lora_A [r, in], lora_B [out, r] per module),
    which `peft.PeftModel.from_pretrained(base_model, path)` loads onto the base's Hugging Face export."""
    modules = _peft_modules(cfg)
    flat = traverse_util.flatten_dict(adapter, sep="/")
    items, arrays = [], []
    for module, spec in modules.items():
        a = np.asarray(sharding.to_host(flat[f"layers/{module}/lora_a"]), np.float32)  # [L, *in, r]
        b = np.asarray(sharding.to_host(flat[f"layers/{module}/lora_b"]), np.float32)  # [L, r, *out]
        for i in range(cfg.num_layers):
            for which, x in (("A", a[i].reshape(-1, cfg.lora_rank).T), ("B", b[i].reshape(cfg.lora_rank, -1).T)):
                items.append((_peft_name(spec, i, which), x.shape, np.dtype(np.float32)))
                arrays.append(x)
    path = Path(path)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                  lora_dropout=dropout, use_rslora=cfg.lora_rslora, bias="none", fan_in_fan_out=cfg.arch == "gpt",
                  # full module names: a short name such as 'c_proj' would also match modules we did not adapt
                  target_modules=sorted(spec.hf.format(i=i).removesuffix(".weight") for spec in modules.values()
                                        for i in range(cfg.num_layers)),
                  base_model_name_or_path=base, init_lora_weights=True, inference_mode=True, modules_to_save=None,
                  revision=None, use_dora=False)
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    _write_safetensors(path / PEFT_WEIGHTS, items, lambda k: arrays[k], jax.process_index() == 0)
    return config


def read_peft_config(path) -> dict:
    """adapter_config.json of a PEFT LoRA directory, checked (ValueError: what is wrong, where)."""
    file = Path(path) / PEFT_CONFIG
    if not file.exists() or not (Path(path) / PEFT_WEIGHTS).exists():
        raise ValueError(f"config.init.adapter={path}: expected a PEFT adapter directory with {PEFT_CONFIG} and "
                         f"{PEFT_WEIGHTS}")
    c = json.loads(file.read_text())
    if c.get("peft_type", "LORA") != "LORA" or c.get("use_dora"):
        raise ValueError(f"{file}: peft_type {c.get('peft_type')!r}{' with DoRA' if c.get('use_dora') else ''}; "
                         f"only plain LoRA adapters load")
    return c


def peft_lora_config(path, cfg: ModelConfig | None = None) -> dict:
    """The config.lora keys a PEFT adapter directory fixes: rank, alpha, rslora, and (given the model `cfg` it
    adapts) targets: the projections its weights cover (per-module rank / alpha patterns are refused)."""
    import dataclasses

    from instructgpt_jax.models.transformer import LORA_TARGETS
    c = read_peft_config(path)
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise ValueError(f"{Path(path) / PEFT_CONFIG}: per-module rank_pattern / alpha_pattern are not supported")
    out = dict(rank=int(c["r"]), alpha=float(c["lora_alpha"]), rslora=bool(c.get("use_rslora", False)))
    if cfg is not None:
        names = set(_memmap_safetensors(Path(path) / PEFT_WEIGHTS))
        targets = []
        for t in LORA_TARGETS:
            try:
                spec = next(iter(_peft_modules(dataclasses.replace(cfg, lora_rank=1, lora_targets=t)).values()))
            except ValueError:  # not a projection of this family, or fused
                continue
            if _peft_name(spec, 0, "A") in names:
                targets.append(t)
        if not targets:
            raise ValueError(f"{Path(path) / PEFT_WEIGHTS}: no lora_A weights of a {hf_model_type(cfg)} model's "
                             f"projections (q_proj, ...); is it an adapter of this model?")
        out["targets"] = ",".join(targets)
    return out


def load_peft_adapter(path, model: Transformer, mesh) -> dict:
    """A PEFT LoRA adapter directory -> our adapters for `model` (a LoRA model whose rank / alpha match it),
    on `mesh` with the shardings a fresh init would have. Every adapted module of every layer must be in it."""
    cfg = model.cfg
    want = peft_lora_config(path)
    got = dict(rank=cfg.lora_rank, alpha=cfg.lora_alpha, rslora=cfg.lora_rslora)
    if want != got:
        raise ValueError(f"config.init.adapter={path} has {want} but config.lora has {got}")
    tensors = _memmap_safetensors(Path(path) / PEFT_WEIGHTS)
    from instructgpt_jax import lora
    shapes, shardings = sharding.param_shardings(
        lambda r: lora.adapters(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]), mesh)
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    out = {}
    for module, spec in _peft_modules(cfg).items():
        for which, leaf in (("A", "lora_a"), ("B", "lora_b")):
            shape = flat_shapes[f"layers/{module}/{leaf}"].shape
            layers = []
            for i in range(cfg.num_layers):
                name = _peft_name(spec, i, which)
                if name not in tensors:
                    raise ValueError(f"{Path(path) / PEFT_WEIGHTS} has no {name}: the adapter does not cover "
                                     f"config.lora.targets={cfg.lora_targets!r}")
                layers.append(np.asarray(tensors[name], np.float32).T.reshape(shape[1:]))
            out[f"layers/{module}/{leaf}"] = np.stack(layers)
    tree = traverse_util.unflatten_dict(out, sep="/")
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


def load_tokenizer(path):
    """The tokenizer of a Hugging Face directory or one of our exports: `data.tokenizer.load_tokenizer`."""
    from instructgpt_jax.data.tokenizer import load_tokenizer as load
    return load(path)


# --------------------------------------------------------------------------- a stage's export -> transformers


_README = {
    "lm": ("Exported by instructgpt_jax from {source} (stage {stage!r}).\n\n"
           "Load with `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and "
           "`transformers.AutoTokenizer.from_pretrained(DIR)`; the chat template is the one the run used "
           "(tokenizer_config.json `chat_template`), and generation_config.json stops at every EOS id {eos}.\n"),
    "rm": ("Reward model exported by instructgpt_jax from {source} (stage 'rm').\n\n"
           "`transformers.AutoModelForSequenceClassification.from_pretrained(DIR)` (num_labels 1) is the trunk and "
           "the scalar head's weight. reward = logits[:, 0] + config.json `reward_bias` ({reward_bias:.6g} = the "
           "head's bias {score_bias:.6g} + the bias fitted so that the SFT demonstrations average 0, `rm_bias` "
           "{rm_bias:.6g}). The reward was trained at the token that closes the reply (config.json "
           "`reward_token_id`, {token!r}): {format}. transformers reads the logits at the last non-pad token, so "
           "the ids must end there: {warning}\n\n"
           "```python\n{snippet}```\n\n"
           "Or score a file of conversations (JSONL or Parquet rows {{messages}} or {{prompt, response}}): "
           "`python -m instructgpt_jax.hf --score --model=DIR --data=FILE.jsonl`. The base model alone: "
           "`AutoModel.from_pretrained(DIR)`; the head with its bias: {score_file} (torch Linear(d_model, 1) "
           "tensors score.weight, score.bias).\n"),
}

# How transformers users score with an exported reward model (the export README holds it; tests run it). {bos} is
# "[tok.bos_token_id] + " when training put a BOS in front that the template / tokenizer call does not add.
RM_SNIPPET = {
    "chat": """\
import torch, transformers
DIR = "."  # this directory
tok = transformers.AutoTokenizer.from_pretrained(DIR)
rm = transformers.AutoModelForSequenceClassification.from_pretrained(DIR).eval()

def reward(messages):  # a conversation ending with the assistant reply to score
    ids = {bos}tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False).input_ids
    ids = ids[:len(ids) - ids[::-1].index(rm.config.reward_token_id)]  # cut after the reply's end of turn
    with torch.no_grad():
        return rm(torch.tensor([ids])).logits[0, 0].item() + rm.config.reward_bias
""",
    "plain": """\
import torch, transformers
DIR = "."  # this directory
tok = transformers.AutoTokenizer.from_pretrained(DIR)
rm = transformers.AutoModelForSequenceClassification.from_pretrained(DIR).eval()

def reward(prompt, response):  # as in training: prompt and response encoded apart, then the EOS
    encode = lambda text: tok(text, add_special_tokens=False).input_ids
    ids = {bos}encode(prompt) + encode(response) + [rm.config.reward_token_id]
    with torch.no_grad():
        return rm(torch.tensor([ids])).logits[0, 0].item() + rm.config.reward_bias
""",
}


def _fail(message: str):
    from instructgpt_jax.errors import UserError
    raise UserError(message)


def _rm_template(export_dir, tok):
    """The chat template a reward model was trained with: the one its run saved with its export (None when
    the run used none, even if the tokenizer has a template of its own)."""
    from instructgpt_jax.data import chat, prepare
    file = os.path.join(export_dir, prepare.TEMPLATE_FILE)
    return chat.resolve(file if os.path.exists(file) else "none", tok)


def _rm_readme_parts(tok, template, end) -> dict:
    """The export README's description of a reward model's input format, and its transformers snippet."""
    from instructgpt_jax.data import chat
    if tok is None:
        return dict(token=None, format="BOS + prompt + reply + EOS", warning="this export has no tokenizer.",
                    snippet="# no tokenizer in this export\n")
    token = tok.id_to_token(end)
    if template is None:
        ids = tok.encode("Hi")
        fmt = (f"{'BOS + ' if tok.add_bos else ''}prompt + response + that token, prompt and response "
               f"encoded apart")
        warning = "append `reward_token_id` after the response."
    else:
        text = chat.render(template, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
                           tok)
        ids, tail = tok.encode(text), text[text.rfind(token) + len(token):] if token in text else ""
        fmt = "the chat template rendering the conversation, its last turn the assistant's reply, up to that token"
        warning = ((f"the template adds {tail!r} after it, where `apply_chat_template` + a forward pass would read "
                    f"a wrong reward; " if tail else "") + "cut the ids after the last `reward_token_id`.")
    bos = tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]  # training put one in front
    snippet = RM_SNIPPET["plain" if template is None else "chat"].format(bos="[tok.bos_token_id] + " if bos else "")
    return dict(token=token, format=fmt, warning=warning, snippet=snippet)


def export_stage(export, out, *, mesh=None) -> dict:
    """Any stage's export (SFT / DPO / PPO policy, PPO EMA, or a reward model) -> a directory that
    `transformers` loads: config.json + model.safetensors (AutoModelForCausalLM; a reward model:
    AutoModelForSequenceClassification + score_head.safetensors, see `save_pretrained(classifier=True)`),
    the run's tokenizer files with its chat template in tokenizer_config.json (AutoTokenizer),
    generation_config.json (eos_token_id = [eos_id] + the other EOS ids, e.g. the template's end of turn),
    and a README.md.

    export: a stage workdir, its export/ or export_ema/ directory. Returns a summary dict.
    """
    from instructgpt_jax import checkpoints
    from instructgpt_jax.data import prepare

    path = checkpoints.export_path(os.fspath(export))
    out = Path(out).absolute()
    if out == Path(path) or Path(path) in out.parents:
        _fail(f"--out={out} is inside the export {path}; choose another directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        _fail(f"--out={out} exists and is not an empty directory or an earlier Hugging Face export; "
              f"choose another directory")
    meta = checkpoints.read_export_meta(path)
    if "model" not in meta:
        _fail(f"{path}/meta.json has no 'model' (not an instructgpt_jax export)")
    rm = "rm_bias" in meta
    cfg = ModelConfig.from_config(meta["model"])
    try:
        hf_model_type(cfg)
    except ValueError as e:
        _fail(f"{path}: {e}")
    model = Transformer(cfg, head="scalar" if rm else "lm")
    mesh = mesh or sharding.default_mesh()
    params = checkpoints.load_params(path, model, mesh)

    tok = None
    if any(os.path.exists(os.path.join(path, f)) for f in prepare.TOKENIZER_FILES):
        tok = load_tokenizer(path)
    template = tok.chat_template if tok is not None else None
    rm_template = _rm_template(path, tok) if rm and tok is not None else None
    if rm:  # what the reward model was trained with, not whatever template its tokenizer carries
        template = rm_template.source if rm_template is not None else None
    extra = {}
    if tok is not None:
        others = sorted(tok.eos_ids - {tok.eos_id})
        extra = dict(eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        if tok.bos_id is not None:
            extra["bos_token_id"] = tok.bos_id
        if rm:  # where the reward was trained to be read: the reply's end-of-turn token (or EOS)
            extra["reward_token_id"] = prepare.end_id(tok, rm_template)
    summary = dict(source=path, out=str(out), stage=meta.get("stage", "?"), model_type=hf_model_type(cfg),
                   kind="rm" if rm else "lm", tokenizer=tok is not None, chat_template=template is not None)
    if rm:
        score_bias = float(np.asarray(sharding.to_host(params["scalar_head"]["bias"])).reshape(-1)[0])
        extra.update(rm_bias=float(meta["rm_bias"]), score_bias=score_bias,
                     reward_bias=score_bias + float(meta["rm_bias"]))
        summary.update(reward_bias=extra["reward_bias"], rm_bias=extra["rm_bias"])
    save_pretrained(model, params, out, classifier=rm, extra_config=extra)
    if jax.process_index() != 0:
        return summary
    for stale in ("generation_config.json", "tokenizer.json", "tokenizer.model", "chat_template.jinja"):
        if (out / stale).exists():  # from an earlier export into the same directory
            (out / stale).unlink()
    if tok is not None:
        tok.save(str(out))
        # transformers takes any file named *tokenizer.json for the tokenizer (Gemma then maps every text to unk):
        # our resolved-ids file stays out; tokenizer_config / generation_config carry the same ids
        from instructgpt_jax.data.tokenizer import META_FILE
        (out / META_FILE).unlink(missing_ok=True)
        tc_path = out / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        if template is not None:  # where AutoTokenizer looks (and where chat_template.jinja, if written, agrees)
            tc["chat_template"] = template
        elif rm:  # trained without a template: apply_chat_template should fail, not format rows it never saw
            tc.pop("chat_template", None)
            (out / "chat_template.jinja").unlink(missing_ok=True)
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        gen = dict(eos_token_id=[tok.eos_id] + others, pad_token_id=tok.pad_id)
        if tok.bos_id is not None:
            gen["bos_token_id"] = tok.bos_id
        if not rm:
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if rm:
        text = _README["rm"].format(source=path, reward_bias=extra["reward_bias"], score_bias=extra["score_bias"],
                                    rm_bias=extra["rm_bias"], score_file=SCORE_FILE,
                                    **_rm_readme_parts(tok, rm_template, extra.get("reward_token_id")))
    else:
        eos = ([tok.eos_id] + others) if tok is not None else "(no tokenizer in the export)"
        text = _README["lm"].format(source=path, stage=summary["stage"], eos=eos)
    (out / "README.md").write_text(text)
    return summary


def export_adapter(export, out) -> dict:
    """A LoRA stage's export -> a PEFT adapter directory (`save_peft_adapter`) for the Hugging Face export of
    the weights it was trained on (meta 'lora' 'base': the previous stage's export or the HF checkpoint)."""
    from instructgpt_jax import checkpoints
    path = checkpoints.export_path(os.fspath(export))
    meta = checkpoints.read_export_meta(path)
    adapter = checkpoints.load_adapter(path)
    if "lora" not in meta or adapter is None:
        _fail(f"--adapter: {path} was not trained with LoRA (config.lora.rank 0); export its merged weights "
              f"without --adapter")
    if "rm_bias" in meta:
        _fail(f"--adapter: {path} is a reward model; PEFT adapters here are causal-LM adapters. Export its merged "
              f"weights without --adapter")
    lo = meta["lora"]
    cfg = ModelConfig.from_config(meta["model"], lo)
    out = Path(out).absolute()
    try:
        save_peft_adapter(cfg, adapter, out, base=lo.get("base", ""), dropout=lo.get("dropout", 0.0))
    except ValueError as e:
        _fail(f"--adapter: {e}")
    return dict(source=path, out=str(out), stage=meta.get("stage", "?"), base=lo.get("base", ""), rank=lo["rank"])


# --------------------------------------------------------------------------- scoring with an exported reward model


_RM_DIRS = ("give the directory `python -m instructgpt_jax.hf --export=RM_WORKDIR --out=DIR` wrote, or the RM "
            "stage's workdir")


def load_reward_model(path, *, mesh=None):
    """(scoring.RewardModel, tokenizer, chat template or None) of a reward model: the directory `hf --export`
    wrote for one (its config.json `rm_bias`, the head from score_head.safetensors), or an RM stage workdir /
    its export/ directory. The tokenizer's eos_ids hold the template's end of turn, as in training."""
    from instructgpt_jax import checkpoints, scoring
    from instructgpt_jax.data import chat, prepare
    from instructgpt_jax.errors import MissingFileError, UserError
    path = Path(path)
    mesh = mesh or sharding.default_mesh()
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such directory; {_RM_DIRS}")
    ours = (path / "meta.json").exists() or (path / checkpoints.EXPORT_DIR / "meta.json").exists()
    if ours:
        rm = scoring.RewardModel.load(str(path), mesh)
        path = Path(checkpoints.export_path(str(path)))
    elif not (path / "config.json").exists():
        raise UserError(f"{path} is not a reward model (no config.json, no meta.json); {_RM_DIRS}")
    else:
        c = _read_config(path)
        if "rm_bias" not in c or not (path / SCORE_FILE).exists():
            raise UserError(f"{path} is not a reward model exported by instructgpt_jax (its config.json has no "
                            f"rm_bias, or there is no {SCORE_FILE}); {_RM_DIRS}")
        model, params = load_pretrained(path, mesh=mesh, dtype=c.get("dtype") or c.get("torch_dtype") or "float32",
                                        head="scalar")  # the head's own bias is in params; rm_bias comes on top
        rm = scoring.RewardModel(model, params, float(c["rm_bias"]), c)
    if not any((path / f).exists() for f in prepare.TOKENIZER_FILES):
        raise UserError(f"{path}: no tokenizer ({' or '.join(prepare.TOKENIZER_FILES)}) to encode conversations with")
    tok = load_tokenizer(path)
    # a stage export: the template its run saved; ours exported: the one export_stage put in tokenizer_config
    template = _rm_template(path, tok) if ours else chat.resolve("auto", tok)
    return rm, chat.with_end_of_turn(tok, template), template


def _conversation(where: str, obj) -> tuple:
    """A row to score -> (prompt, the turns before the reply or None, reply)."""
    from instructgpt_jax.data import builders
    from instructgpt_jax.errors import UserError
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        role = messages[-1].get("role", messages[-1].get("from"))
        if role not in ("assistant", "gpt"):
            raise UserError(f"{where}: the last turn of 'messages' must be the assistant reply to score, "
                            f"got role {role!r}")
    row = builders.validate_row("demonstrations", obj, where)
    if not row["messages"]:
        return row["prompt"], None, row["response"]
    if len(row["messages"]) < 2:
        raise UserError(f"{where}: 'messages' holds only the reply; give the conversation before it too")
    return "", row["messages"][:-1], row["messages"][-1]["content"]


def score_conversations(model, rows, *, batch_size: int = 8, mesh=None, where=None) -> np.ndarray:
    """Rewards (bias included) of conversations, each formatted exactly as the reward model was trained: the
    chat template (or BOS + prompt + response + EOS without one), the reward read at the token that closes
    the reply. (transformers' `apply_chat_template` + a forward pass reads it after that token, where the
    template goes on, e.g. at a newline: a different number.)

    model: the directory `hf --export` wrote for a reward model, an RM stage workdir or its export/, or
      what `load_reward_model` returned (to score many times without reloading).
    rows: dicts {messages: [{role, content}, ...]} whose last turn is the assistant reply to score, or
      {prompt, response}. where: a label per row for error messages (default 'row i').
    A row longer than the model's max_len is cropped as in training: the prompt from the left to
    max_len // 2 tokens, then the reply cut, keeping its closing token. Returns float32 [len(rows)].
    """
    from instructgpt_jax.data import chat, iterators
    from instructgpt_jax.errors import UserError
    rows = list(rows)
    where = list(where) if where is not None else [f"row {i}" for i in range(len(rows))]
    convs = [_conversation(w, r) for w, r in zip(where, rows)]  # bad rows fail before the model loads
    mesh = mesh or sharding.default_mesh()
    rm, tok, template = model if isinstance(model, tuple) else load_reward_model(model, mesh=mesh)
    n = rm.model.cfg.max_len
    examples = []
    for w, (prompt, before, reply) in zip(where, convs):
        if before is not None and template is None:
            raise UserError(f"{w}: a conversation ('messages'), but this reward model was trained without a chat "
                            f"template: give {{prompt, response}} rows")
        try:
            if template is None:  # BOS + prompt + reply + EOS
                size = int(tok.add_bos and tok.bos_id is not None) + len(tok.encode(prompt)) + len(tok.encode(reply))
            else:
                conv = chat.as_messages({"prompt": prompt, "messages": before}, with_response=False)
                ids, body, _ = chat.scoring_ids(template, conv, reply, tok)
                size = len(ids) + len(body)
            examples.append(iterators.scoring_example(  # the prompt is cropped only when the row does not fit
                prompt, reply, tok, seq_len=n, max_prompt_len=n if size < n else n // 2, chat_template=template,
                messages=before))
        except ValueError as e:
            raise UserError(f"{w}: {e}") from None
    return rm.score_examples(examples, batch_size=batch_size, mesh=mesh)


def read_scoring_file(path) -> tuple[list, list]:
    """(rows, where) of a JSONL or Parquet file for `score_conversations`; where = 'file:line' / 'file:row N'."""
    from instructgpt_jax.data import builders
    from instructgpt_jax.errors import MissingFileError, UserError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such file")
    objects = (builders._parquet_objects if builders._file_type(path) == "parquet" else builders._jsonl_objects)(path)
    pairs = [(obj, where) for _, where, obj in objects]
    if not pairs:
        raise UserError(f"{path}: no rows")
    return [o for o, _ in pairs], [w for _, w in pairs]


def _cli():
    """`python -m instructgpt_jax.hf --export=WORKDIR --out=DIR` and `python -m instructgpt_jax.hf --score
    --model=DIR --data=FILE [--out=FILE.jsonl] [--batch_size=N]`: mistakes print one line `error: ...` and exit
    with status 2 (--debug or INSTRUCTGPT_DEBUG=1 shows the traceback), as the main command line does."""
    import sys

    from absl import app, flags

    from instructgpt_jax import errors

    usage = ("usage: python -m instructgpt_jax.hf --export=WORKDIR --out=DIR [--adapter], or python -m instructgpt_jax.hf "
             "--score --model=DIR --data=FILE [--out=FILE.jsonl] [--batch_size=N]")
    flags.DEFINE_string("export", None, "A stage's workdir, or its export/ or export_ema/ directory.")
    flags.DEFINE_string("out", None, "--export: directory to write (transformers' from_pretrained reads it); "
                                     "--score: JSON lines file to write (default: stdout).")
    flags.DEFINE_bool("adapter", False, "--export: write the LoRA adapters as a PEFT adapter directory "
                                        "(adapter_config.json + adapter_model.safetensors) instead of merged weights.")
    flags.DEFINE_bool("score", False, "Score conversations with a reward model (--model, --data): one JSON line "
                                      "per row, its fields plus 'reward'; the count and mean on stderr.")
    flags.DEFINE_string("model", None, "--score: the directory --export wrote for a reward model, or the RM "
                                       "stage's workdir.")
    flags.DEFINE_string("data", None, "--score: JSONL or Parquet rows {messages} (the last turn is the assistant "
                                      "reply to score) or {prompt, response}.")
    flags.DEFINE_integer("batch_size", 8, "--score: rows per forward pass.")
    flags.DEFINE_bool("debug", False, f"Show the traceback of an error; also {errors.DEBUG_ENV}=1.")

    debug, fail = errors.debug_requested, errors.exit_user_error

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            if debug(argv):
                raise
            fail(errors.one_line(e))
        if len(rest) > 1:
            fail(f"unexpected arguments {rest[1:]}; {usage}")
        f = flags.FLAGS
        if f.score and f.export:
            fail(f"--score and --export are two commands; give one; {usage}")
        for name in ("model", "data") if f.score else ("export", "out"):
            if not f[name].value:
                fail(f"--{name} is required{' with --score' if f.score else ''}; {usage}")
        if f.score and f.batch_size < 1:
            fail(f"--batch_size={f.batch_size}: must be at least 1")
        return rest

    def score():
        f = flags.FLAGS
        rows, where = read_scoring_file(f.data)
        rewards = score_conversations(f.model, rows, batch_size=f.batch_size, where=where)
        lines = "".join(json.dumps({**r, "reward": float(x)}, ensure_ascii=False, default=str) + "\n"
                        for r, x in zip(rows, rewards))
        if f.out:
            Path(f.out).write_text(lines, encoding="utf-8")
        else:
            sys.stdout.write(lines)
        sys.stderr.write(f"scored {len(rows)} rows of {f.data} with {f.model}: mean reward {rewards.mean():.6g}"
                         + (f"; written to {f.out}" if f.out else "") + "\n")

    def main(argv):
        from absl import logging
        logging.set_verbosity(logging.WARNING)
        try:
            if flags.FLAGS.score:
                return score()
            if flags.FLAGS.adapter:
                s = export_adapter(flags.FLAGS.export, flags.FLAGS.out)
                print(f"exported the rank-{s['rank']} LoRA adapters of {s['source']} ({s['stage']}) to {s['out']}: "
                      f"peft.PeftModel.from_pretrained(base, '{s['out']}'), base = the Hugging Face export of "
                      f"{s['base'] or 'the weights it was trained on'}")
                return
            s = export_stage(flags.FLAGS.export, flags.FLAGS.out)
        except errors.USER_ERRORS as e:
            if debug(argv):
                raise
            fail(errors.one_line(e))
        what = "reward model (AutoModelForSequenceClassification)" if s["kind"] == "rm" else \
            "AutoModelForCausalLM"
        print(f"exported {s['source']} ({s['stage']}) to {s['out']}: {s['model_type']} {what}"
              + ("" if s["tokenizer"] else "; no tokenizer in the export"))

    app.run(main, flags_parser=parse)

if __name__ == "__main__":
    _cli()
