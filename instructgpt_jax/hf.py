"""Hugging Face checkpoints <-> our params, for GPT-2 and LLaMA (and Mistral-shaped) models.

    model, params = hf.load_pretrained("/path/to/hf_dir", mesh=mesh)  # config.json + *.safetensors
    logits = model.apply({"params": params}, tokens)                  # [B, T, V]
    hf.save_pretrained(model, params, "/path/out")                    # transformers loads it

Safetensors files are read as numpy memory maps (the format is an 8-byte header length, a JSON
header, then raw little-endian tensors): bfloat16 works without torch, and each device's shard is
copied from the page cache straight into its sharding, so the host never holds a second full copy
of the model. Pickle checkpoints (.bin, .pt) are refused, never unpickled.

Layouts: GPT-2's Conv1D weights are already [in, out] (c_attn fuses q|k|v on the last axis);
torch nn.Linear weights (LLaMA) are [out, in], i.e. ours transposed. Our RoPE uses the Hugging Face
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

SUPPORTED = ("GPT2LMHeadModel", "GPT2Model", "LlamaForCausalLM", "LlamaModel", "MistralForCausalLM",
             "MistralModel")
_MODEL_TYPES = {"gpt2": "gpt", "llama": "llama", "mistral": "llama"}
_PREFIX = {"gpt": "transformer.", "llama": "model."}  # HF base-model prefix inside *ForCausalLM
# HF buffers that are not weights: GPT-2's causal-mask buffers, old LLaMA rotary caches.
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(masked_)?bias|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
SCORE_FILE = "score_head.safetensors"


# --------------------------------------------------------------------------- config


def _read_config(path) -> dict:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no config.json (expected a Hugging Face model directory)")
    return json.loads(file.read_text())


def model_config_dict(hf_config) -> dict:
    """`config.model` keys (see config_lib.model_config) from an HF config.json dict, file or directory.

    Only the keys a checkpoint determines; `config.model.update(...)` keeps dropout, dtype, remat, etc.
    """
    c = hf_config if isinstance(hf_config, dict) else _read_config(hf_config)
    archs, model_type = c.get("architectures") or [], c.get("model_type")
    bad = [a for a in archs if a not in SUPPORTED]
    if bad or model_type not in _MODEL_TYPES:
        raise ValueError(f"unsupported Hugging Face architecture {bad[0] if bad else model_type!r} "
                         f"(model_type {model_type!r}); supported: {', '.join(SUPPORTED)}")

    def require(key, ok, default=None):
        if c.get(key, default) not in ok:
            raise ValueError(f"config.json: {key}={c.get(key, default)!r} is not supported (only {ok})")

    if _MODEL_TYPES[model_type] == "gpt":
        # nn.gelu defaults to the tanh approximation, which is GPT-2's 'gelu_new'.
        require("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        require("scale_attn_weights", (True,), True)
        require("scale_attn_by_inverse_layer_idx", (False,), False)
        require("add_cross_attention", (False,), False)
        d, heads = c["n_embd"], c["n_head"]
        return dict(arch="gpt", vocab_size=c["vocab_size"], num_layers=c["n_layer"], d_model=d,
                    num_heads=heads, num_kv_heads=heads, head_dim=d // heads, mlp_dim=c.get("n_inner") or 4 * d,
                    max_len=c["n_positions"], tie_embeddings=c.get("tie_word_embeddings", True),
                    norm_eps=c.get("layer_norm_epsilon", 1e-5), rope_theta=10000.0)

    require("hidden_act", ("silu",), "silu")
    require("attention_bias", (False,), False)
    require("mlp_bias", (False,), False)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers >= 5 | < 5
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json: RoPE scaling {rope!r} is not supported (only plain RoPE)")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    max_len = c["max_position_embeddings"]
    if c.get("sliding_window"):  # Mistral: within the window, sliding attention is full attention
        max_len = min(max_len, c["sliding_window"])
    return dict(arch="llama", vocab_size=c["vocab_size"], num_layers=c["num_hidden_layers"], d_model=d,
                num_heads=heads, num_kv_heads=c.get("num_key_value_heads") or heads,
                head_dim=c.get("head_dim") or d // heads, mlp_dim=c["intermediate_size"], max_len=max_len,
                tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6),
                rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0))


def _hf_config(cfg: ModelConfig, base: bool, dtype) -> dict:
    """config.json for transformers from our ModelConfig."""
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]
    if cfg.arch == "gpt":
        if cfg.num_kv_heads != cfg.num_heads or cfg.num_heads * cfg.head_dim != cfg.d_model:
            raise ValueError("GPT-2 export needs num_kv_heads == num_heads and num_heads * head_dim == d_model")
        return dict(architectures=["GPT2Model" if base else "GPT2LMHeadModel"], model_type="gpt2",
                    vocab_size=cfg.vocab_size, n_layer=cfg.num_layers, n_embd=cfg.d_model, n_head=cfg.num_heads,
                    n_inner=cfg.mlp_dim, n_positions=cfg.max_len, n_ctx=cfg.max_len,
                    layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                    resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
                    tie_word_embeddings=cfg.tie_embeddings, dtype=dtype, torch_dtype=dtype)
    return dict(architectures=["LlamaModel" if base else "LlamaForCausalLM"], model_type="llama",
                vocab_size=cfg.vocab_size, num_hidden_layers=cfg.num_layers, hidden_size=cfg.d_model,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=cfg.tie_embeddings,
                # both spellings: transformers < 5 reads rope_theta, >= 5 rope_parameters
                rope_theta=cfg.rope_theta, rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta),
                dtype=dtype, torch_dtype=dtype)


# --------------------------------------------------------------------------- the name/layout table


class _Spec(NamedTuple):
    ours: tuple   # our param paths; several = fused into one HF tensor along its last axis
    hf: str       # HF tensor name; '{i}' = one tensor per layer, stacked on our leading layer axis
    shape: tuple  # the HF tensor's shape
    kind: str     # 'copy' (same layout), 'linear' (torch [out, in] = ours transposed), 'split' (fused)


def _specs(cfg: ModelConfig, head: str) -> list[_Spec]:
    d, h, kv, dh, m, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    S = _Spec
    if cfg.arch == "gpt":
        def ln(ours, hf):
            return [S((f"{ours}/LayerNorm_0/scale",), f"{hf}.weight", (d,), "copy"),
                    S((f"{ours}/LayerNorm_0/bias",), f"{hf}.bias", (d,), "copy")]
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
    else:
        a, f = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
        specs = [S(("embed/embedding",), "model.embed_tokens.weight", (v, d), "copy"),
                 S(("layers/ln_attn/scale",), "model.layers.{i}.input_layernorm.weight", (d,), "copy"),
                 S(("layers/attn/query/kernel",), a + "q_proj.weight", (h * dh, d), "linear"),
                 S(("layers/attn/key/kernel",), a + "k_proj.weight", (kv * dh, d), "linear"),
                 S(("layers/attn/value/kernel",), a + "v_proj.weight", (kv * dh, d), "linear"),
                 S(("layers/attn/out/kernel",), a + "o_proj.weight", (d, h * dh), "linear"),
                 S(("layers/ln_mlp/scale",), "model.layers.{i}.post_attention_layernorm.weight", (d,), "copy"),
                 S(("layers/mlp/wi_gate/kernel",), f + "gate_proj.weight", (m, d), "linear"),
                 S(("layers/mlp/wi_up/kernel",), f + "up_proj.weight", (m, d), "linear"),
                 S(("layers/mlp/wo/kernel",), f + "down_proj.weight", (d, m), "linear"),
                 S(("ln_final/scale",), "model.norm.weight", (d,), "copy")]
    if head == "lm" and not cfg.tie_embeddings:
        specs.append(S(("lm_head/kernel",), "lm_head.weight", (v, d), "linear"))
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
    return a.reshape(shape)


def _to_hf(spec: _Spec, xs: list) -> np.ndarray:
    if spec.kind == "linear":
        return xs[0].reshape(spec.shape[::-1]).T
    if spec.kind == "split":
        return np.concatenate([x.reshape(spec.shape[:-1] + (-1,)) for x in xs], axis=-1)
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
    prefix = _PREFIX[arch]
    if not any(k.startswith(prefix) for k in tensors):  # a base model (GPT2Model, LlamaModel) checkpoint
        tensors = {k if k.startswith("lm_head.") else prefix + k: t for k, t in tensors.items()}
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
    ignored = lambda k: _IGNORED.fullmatch(k) or (k == "lm_head.weight" and (cfg.tie_embeddings or head != "lm"))
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


def save_pretrained(model: Transformer, params, path, *, trunk_only: bool = False):
    """Write config.json + model.safetensors that transformers loads.

    LM models -> AutoModelForCausalLM (GPT2LMHeadModel / LlamaForCausalLM). trunk_only=True writes the
    base model (AutoModel: GPT2Model / LlamaModel) and, for a scalar-head (reward / value) model, the
    head as torch Linear(d_model, 1) tensors 'score.weight', 'score.bias' in score_head.safetensors.
    Call it on every process (params are gathered tensor by tensor); process 0 writes.
    """
    params = nn.unbox(params)  # also accept model.init(...) output, boxed with logical axes
    if set(params) == {"params"}:
        params = params["params"]
    if model.head == "scalar" and not trunk_only:
        raise ValueError("a scalar-head (reward / value) model has no transformers LM equivalent; pass "
                         "trunk_only=True to write the base model plus its head in " + SCORE_FILE)
    cfg, path = model.cfg, Path(path)
    flat = traverse_util.flatten_dict(params, sep="/")
    specs = _specs(cfg, model.head)
    _check_table(specs, flat)
    write = jax.process_index() == 0
    if write:
        path.mkdir(parents=True, exist_ok=True)
        dtype = flat["embed/embedding"].dtype
        (path / "config.json").write_text(json.dumps(_hf_config(cfg, trunk_only, dtype), indent=2) + "\n")

    prefix = _PREFIX[cfg.arch]
    files = {"model.safetensors": [s for s in specs if not s.hf.startswith(("lm_head.", "score."))
                                   or (s.hf.startswith("lm_head.") and not trunk_only)],
             SCORE_FILE: [s for s in specs if s.hf.startswith("score.")]}
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


def load_tokenizer(path):
    """Path of the directory's SentencePiece `tokenizer.model`, or None (e.g. GPT-2's BPE tokenizer.json)."""
    file = Path(path) / "tokenizer.model"
    return str(file) if file.exists() else None
