"""Size presets (the one table) and the config pieces every stage shares.

Config files under `configs/` import only this module: their `get_config(preset)` starts from
`base_config(stage, preset)` and adds the `train`, `optim`, `data` blocks built here plus the
stage's own keys.
"""
from __future__ import annotations

import os

import ml_collections

# name: (arch, layers, d_model, heads, kv_heads, d_head, mlp_dim, context, vocab)
# GPT-3 family: Brown et al. 2020, Table 2.1. Two departures, both so that
# heads * d_head == d_model and every width shards evenly over 8 devices:
#   1.3B uses 16 heads of 128 (the paper lists 24 heads of 128 with d_model 2048);
#   13B uses d_model 5120 (the paper lists 5140 = 4 * 5 * 257, with 40 heads of 128).
# Their vocabulary (GPT-2's 50257 BPE tokens) is padded to 50304 = 393 * 128 so that tensor
# parallelism can shard it; the gpt2* rows keep 50257 to match Hugging Face checkpoints.
# The Hugging Face family rows take their shapes from the published config.json files (vocab as the
# checkpoints have it, Pythia's padded to 50304 / 50432); their other keys are in PRESET_KEYS.
PRESETS = {
    # name        arch    L    d_model heads kv  d_head  mlp     ctx   vocab
    "tiny":      ("gpt",   2,     64,   4,   4,   16,     256,   128,   512),
    "mini":      ("gpt",   4,    128,   4,   4,   32,     512,   128,   512),
    "small":     ("gpt",   6,    256,   8,   8,   32,    1024,   128,   512),
    "125m":      ("gpt",  12,    768,  12,  12,   64,    3072,  2048, 50304),
    "350m":      ("gpt",  24,   1024,  16,  16,   64,    4096,  2048, 50304),
    "760m":      ("gpt",  24,   1536,  16,  16,   96,    6144,  2048, 50304),
    "1.3b":      ("gpt",  24,   2048,  16,  16,  128,    8192,  2048, 50304),
    "2.7b":      ("gpt",  32,   2560,  32,  32,   80,   10240,  2048, 50304),
    "6.7b":      ("gpt",  32,   4096,  32,  32,  128,   16384,  2048, 50304),
    "13b":       ("gpt",  40,   5120,  40,  40,  128,   20480,  2048, 50304),
    "175b":      ("gpt",  96,  12288,  96,  96,  128,   49152,  2048, 50304),
    # Hugging Face shapes, for hf.load_pretrained checkpoints (GPT-2: Radford et al. 2019).
    "gpt2":        ("gpt",  12,    768,  12,  12,   64,    3072,  1024, 50257),
    "gpt2-medium": ("gpt",  24,   1024,  16,  16,   64,    4096,  1024, 50257),
    "gpt2-large":  ("gpt",  36,   1280,  20,  20,   64,    5120,  1024, 50257),
    "gpt2-xl":     ("gpt",  48,   1600,  25,  25,   64,    6400,  1024, 50257),
    "tinyllama-1.1b": ("llama", 22, 2048, 32,   4,   64,    5632,  2048, 32000),
    "llama2-7b":   ("llama", 32,  4096,  32,  32,  128,   11008,  4096, 32000),
    "llama3-8b":   ("llama", 32,  4096,  32,   8,  128,   14336,  8192, 128256),
    "qwen2.5-0.5b": ("llama", 24,   896,  14,   2,   64,    4864, 32768, 151936),
    "qwen2.5-1.5b": ("llama", 28,  1536,  12,   2,  128,    8960, 32768, 151936),
    "qwen2.5-7b":  ("llama", 28,  3584,  28,   4,  128,   18944, 32768, 152064),
    "qwen3-0.6b":  ("llama", 28,  1024,  16,   8,  128,    3072, 40960, 151936),
    "qwen3-1.7b":  ("llama", 28,  2048,  16,   8,  128,    6144, 40960, 151936),
    "qwen3-8b":    ("llama", 36,  4096,  32,   8,  128,   12288, 40960, 151936),
    "gemma-2b":    ("llama", 18,  2048,   8,   1,  256,   16384,  8192, 256000),
    "gemma2-2b":   ("llama", 26,  2304,   8,   4,  256,    9216,  8192, 256000),
    "mistral-7b":  ("llama", 32,  4096,  32,   8,  128,   14336, 32768, 32000),   # v0.1 (sliding window)
    "smollm2-135m": ("llama", 30,  576,   9,   3,   64,    1536,  8192, 49152),
    "smollm2-360m": ("llama", 32,  960,  15,   5,   64,    2560,  8192, 49152),
    "smollm2-1.7b": ("llama", 24, 2048,  32,  32,   64,    8192,  8192, 49152),
    "pythia-160m": ("neox",  12,   768,  12,  12,   64,    3072,  2048, 50304),
    "pythia-410m": ("neox",  24,  1024,  16,  16,   64,    4096,  2048, 50304),
    "pythia-1b":   ("neox",  16,  2048,   8,   8,  256,    8192,  2048, 50304),
    "pythia-1.4b": ("neox",  24,  2048,  16,  16,  128,    8192,  2048, 50304),
    "pythia-2.8b": ("neox",  32,  2560,  32,  32,   80,   10240,  2048, 50304),
    "pythia-6.9b": ("neox",  32,  4096,  32,  32,  128,   16384,  2048, 50432),
}
# Nominal parameter counts (tests check eval_shape counts against these within 5 %).
NOMINAL_PARAMS = {
    "125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9,
    "6.7b": 6.7e9, "13b": 13e9, "175b": 175e9,
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.5e9,
    "tinyllama-1.1b": 1.1e9, "llama2-7b": 6.74e9, "llama3-8b": 8.03e9,
    "qwen2.5-0.5b": 494e6, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.62e9,
    "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-8b": 8.2e9,
    "gemma-2b": 2.51e9, "gemma2-2b": 2.61e9, "mistral-7b": 7.24e9,
    "smollm2-135m": 135e6, "smollm2-360m": 362e6, "smollm2-1.7b": 1.71e9,
    "pythia-160m": 162e6, "pythia-410m": 405e6, "pythia-1b": 1.01e9, "pythia-1.4b": 1.41e9,
    "pythia-2.8b": 2.78e9, "pythia-6.9b": 6.86e9,
}
# Model keys where a preset departs from model_config's defaults (its family's keys, RoPE base, ...).
_QWEN = dict(rope_theta=1e6, norm_eps=1e-6)
_GEMMA = dict(activation="gelu_tanh", norm_unit_offset=True, embed_scale=True, tie_embeddings=True, norm_eps=1e-6)
_PYTHIA = dict(parallel_residual=True, rotary_pct=0.25, tie_embeddings=False)
PRESET_KEYS = {
    "llama3-8b": dict(rope_theta=500000.0),
    "qwen2.5-0.5b": dict(_QWEN, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, qkv_bias=True),
    "qwen3-0.6b": dict(_QWEN, qk_norm=True, tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN, qk_norm=True, tie_embeddings=True),
    "qwen3-8b": dict(_QWEN, qk_norm=True),
    "gemma-2b": _GEMMA,
    "gemma2-2b": dict(_GEMMA, sandwich_norm=True, attn_softcap=50.0, final_softcap=30.0,
                      query_pre_attn_scalar=256.0, sliding_window=4096, sliding_pattern="SF"),
    "mistral-7b": dict(sliding_window=4096),
    "smollm2-135m": dict(rope_theta=100000.0, tie_embeddings=True),
    "smollm2-360m": dict(rope_theta=100000.0, tie_embeddings=True),
    "smollm2-1.7b": dict(rope_theta=130000.0, tie_embeddings=True),
    **{name: _PYTHIA for name in PRESETS if name.startswith("pythia-")},
}
# Speed-only model keys where other values than the defaults (1) measured faster: benchmarks/README.md
# (tiny SFT step on 2 CPU cores, median: 88 ms -> 78 ms unrolled -> 61 ms with 4 causal blocks too).
SPEED_KEYS = {"tiny": dict(scan_unroll=2, causal_blocks=4)}
# Presets small enough to train on a laptop CPU: stage configs give them fast schedules.
CPU_PRESETS = ("tiny", "mini", "small")
# Starting from a checkpoint (config.init.hf_path or config.init.from_workdir): the model comes from it, the
# sequence length from the data and the schedule in epochs over the data (stage configs give the recipe).
FINETUNE = "finetune"
FROM_CHECKPOINT = "checkpoint"  # config.model.preset of a model taken from a checkpoint


def check_preset(name: str) -> str:
    name = name.strip().lower()
    if name not in PRESETS and name != FINETUNE:
        raise ValueError(f"unknown preset {name!r}; valid presets: {FINETUNE}, {', '.join(PRESETS)}")
    return name


def model_config(preset: str) -> ml_collections.ConfigDict:
    """The `config.model` block for a preset ('finetune': a placeholder the checkpoint's model replaces)."""
    preset = check_preset(preset)
    if preset == FINETUNE:
        return ml_collections.ConfigDict(dict(model_config("tiny"), preset=FROM_CHECKPOINT, scan_unroll=1,
                                              causal_blocks=1, dtype="bfloat16", logits_chunk=512,
                                              remat="full"))
    arch, layers, d_model, heads, kv_heads, d_head, mlp, ctx, vocab = PRESETS[preset]
    speed = SPEED_KEYS.get(preset, {})  # these two change speed only, never results
    keys = dict(
        preset=preset,           # which row of config_lib.PRESETS this came from (informational)
        # 'gpt' (GPT-3: learned positions, LayerNorm, GELU), 'llama' (RoPE, RMSNorm, gated MLP) or
        # 'neox' (GPT-NeoX: RoPE, LayerNorm, GELU, biases)
        arch=arch,
        vocab_size=vocab,        # embedding rows; must be >= the tokenizer's vocabulary
        num_layers=layers,       # transformer blocks
        d_model=d_model,         # residual stream width
        num_heads=heads,         # query heads
        num_kv_heads=kv_heads,   # key/value heads (< num_heads: grouped-query attention)
        head_dim=d_head,         # width of one attention head
        mlp_dim=mlp,             # hidden width of the MLP
        max_len=ctx,             # context length (size of the learned position table)
        dropout=0.0,             # residual dropout rate (paper SFT: 0.2); off in eval and sampling
        dtype="float32",         # compute dtype: 'float32' or 'bfloat16' (params stay float32)
        tie_embeddings=arch == "gpt",  # LM head reuses the token embedding
        norm_eps=1e-5,           # LayerNorm / RMSNorm epsilon
        rope_theta=10000.0,      # RoPE base (llama / neox arch)
        # activation rematerialisation per block: 'none', 'full' (keep each block's input only), 'dots'. The
        # full-size presets and checkpoints default to 'full': memory first (a PPO-ptx iteration of SmolLM2-135M
        # with LoRA: 13.95 -> 3.32 GB peak RSS, benchmarks/README.md section 6); results are unchanged
        remat="none" if preset in CPU_PRESETS else "full",
        scan_unroll=speed.get("scan_unroll", 1),      # layers per layer-scan iteration in training / scoring
        causal_blocks=speed.get("causal_blocks", 1),  # query blocks that skip the keys after them (1 = off)
        # the LM head over chunks of about this many tokens (rows x positions) in the losses (0 = all at once):
        # [rows, tokens, vocab] float32 logits never exist in full (speed / memory only, never results)
        logits_chunk=0 if preset in CPU_PRESETS else 512,
        # Family keys (Hugging Face architectures); these defaults are plain GPT-3 / LLaMA / GPT-NeoX.
        activation="",           # MLP activation 'gelu_tanh', 'gelu' (exact), 'silu'; '' = the arch's (gpt: gelu_tanh, llama: silu, neox: gelu)
        qkv_bias=False,          # biases on the q, k, v projections of a llama-arch model (Qwen2)
        qk_norm=False,           # RMSNorm over each head's q and k before RoPE (Qwen3)
        norm_unit_offset=False,  # RMSNorm scales by (1 + w), w stored zero-centred (Gemma)
        embed_scale=False,       # token embeddings times sqrt(d_model), in the compute dtype (Gemma)
        sandwich_norm=False,     # norms on the attention and MLP outputs too, before the residual add (Gemma 2)
        parallel_residual=False,  # x + attn(norm(x)) + mlp(norm'(x)) in one step (GPT-NeoX use_parallel_residual)
        rotary_pct=1.0,          # fraction of each head's dims that RoPE rotates (GPT-NeoX / Pythia: 0.25)
        rope_scaling="default",  # RoPE frequency scaling: 'default' (none) or 'llama3' (Llama 3.1 / 3.2)
        rope_factor=1.0,         # llama3 scaling: factor long wavelengths are stretched by
        rope_low_freq_factor=1.0,   # llama3 scaling: wavelengths above original_max_len / this are stretched
        rope_high_freq_factor=4.0,  # llama3 scaling: wavelengths below original_max_len / this are kept
        rope_original_max_len=8192,  # llama3 scaling: the pre-training context length
        query_pre_attn_scalar=0.0,  # attention scores scale 1/sqrt(this) (0 = head_dim; Gemma 2)
        attn_softcap=0.0,        # attention scores -> c * tanh(scores / c) (0 = off; Gemma 2: 50)
        final_softcap=0.0,       # LM logits -> c * tanh(logits / c) (0 = off; Gemma 2: 30)
        sliding_window=0,        # sliding-window layers see the last this many tokens (0 = all layers full)
        sliding_pattern="S",     # which layers slide, repeated over the layers: 'S' sliding, 'F' full (Gemma 2: 'SF')
    )
    keys.update(PRESET_KEYS.get(preset, {}))
    return ml_collections.ConfigDict(keys)


def mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        data=1,     # pure data-parallel replicas
        fsdp=-1,    # parameter/optimizer sharding (ZeRO-3 style); -1 = all remaining devices
        tensor=1,   # Megatron-style tensor parallelism over heads / MLP / vocab
    ))


def optim_config(lr: float, *, warmup_steps: int = 0, weight_decay: float = 0.0) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        lr=lr,                       # peak learning rate
        end_lr_frac=0.1,             # cosine decays to this fraction of the peak (paper: 10 %)
        warmup_steps=warmup_steps,   # linear warmup steps from warmup_init_frac * lr
        warmup_frac=0.0,             # > 0: warmup over this fraction of the steps instead of warmup_steps
        warmup_init_frac=0.0,        # warmup starts at this fraction of the peak
        b1=0.9,                      # Adam beta1 (paper)
        b2=0.95,                     # Adam beta2 (paper)
        eps=1e-8,                    # Adam epsilon
        weight_decay=weight_decay,   # AdamW decoupled weight decay (not applied to norms/biases)
        grad_clip=1.0,               # global-norm gradient clipping; 0 disables
    ))


def train_config(*, num_steps: int, batch_size: int, cpu: bool) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps,                   # optimizer steps (stage steps: PPO iterations)
        num_epochs=0.0,                        # > 0: num_steps = this many passes over the training data (derived at start)
        batch_size=batch_size,                 # global batch (rows / prompts), split over processes
        grad_accum=1,                          # microbatches per step, accumulated inside the jitted step
        log_every=5 if cpu else 50,            # steps between metric records
        eval_every=25 if cpu else 500,         # steps between eval passes (0 = only at the end)
        eval_batches=4 if cpu else 50,         # eval batches per pass (0 = the whole eval split)
        eval_tasks="",                         # lm-eval tasks run on the current params (e.g. 'hellaswag,arc_easy',
                                               # or task YAML files); '' = none. Needs the `eval` extra
        eval_tasks_every=0,                    # steps between task runs (0 = only at the end)
        eval_tasks_limit=0,                    # examples per task (0 = all)
        eval_tasks_include_path="",            # a directory of extra task YAML files
        checkpoint_every=50 if cpu else 1000,  # steps between (async) checkpoints
        keep_checkpoints=2,                    # how many recent checkpoints to keep
        progress=True,                         # tqdm progress bar with ETA
    ))


def base_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    """Keys every stage has; stage configs add `data`, `train`, `optim` and their own block."""
    preset = check_preset(preset)
    config = ml_collections.ConfigDict()
    config.stage = stage          # which stage main.py runs: pretrain, sft, rm, ppo, pipeline
    config.seed = 0               # one seed for init, dropout, data order and sampling
    config.model = model_config(preset)
    config.mesh = mesh_config()
    config.init = ml_collections.ConfigDict(dict(
        from_workdir="",   # previous stage's workdir (its export/ is loaded); '' = none
        hf_path="",        # local Hugging Face directory: SFT starts from it; later stages take config.model from it
        adapter="",        # a PEFT LoRA adapter directory the adapters start from (its rank / alpha / targets win)
    ))
    # LoRA (Hu et al. 2021) / QLoRA (Dettmers et al. 2023): train low-rank adapters on a frozen base (lora.py)
    config.lora = ml_collections.ConfigDict(dict(
        rank=0,                # adapter rank r; 0 = off (full fine-tuning, the paper's recipe)
        alpha=16.0,            # the update is (alpha / r) * x A B (rslora: alpha / sqrt(r))
        dropout=0.0,           # dropout on the adapters' input, in training steps only
        targets="all-linear",  # 'all-linear' or a comma list of q, k, v, o, gate, up, down
        rslora=False,          # rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)
        base_dtype="float32",  # how the frozen base's block weights are stored: float32, bfloat16, int8, nf4
    ))
    return config


def is_cpu_preset(preset: str) -> bool:
    return check_preset(preset) in CPU_PRESETS


def finetune_schedule(config, *, lr: float, epochs: float, batch_size: int, warmup_frac: float,
                      end_lr_frac: float = 0.0) -> None:
    """The `finetune` presets' schedule: `epochs` passes over the data (steps derived from its size at start),
    linear warmup over `warmup_frac` of them from 0, cosine to `end_lr_frac`; bf16 compute, f32 master weights."""
    config.train.num_steps = 0
    config.train.num_epochs = epochs
    config.train.batch_size = batch_size
    config.optim.lr = lr
    config.optim.warmup_steps = 0
    config.optim.warmup_frac = warmup_frac
    config.optim.end_lr_frac = end_lr_frac
    config.optim.weight_decay = 0.0
    config.model.dropout = 0.0
    for key in ("seq_len", "max_prompt_len", "ptx_seq_len"):  # 0: measured on the data at start
        if key in config.data:
            config.data[key] = 0


def replace(config: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
    """Copy of `config` with dotted-key overrides, e.g. replace(c, **{'train.num_steps': 3})."""
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(node.keys()))}")
        node[leaf] = value
    return config


def data_config(*, seq_len: int, max_prompt_len: int, max_response_len: int) -> ml_collections.ConfigDict:
    """The `config.data` block of the LM stages (pretrain, SFT)."""
    return ml_collections.ConfigDict(dict(
        train="",                # JSONL / Parquet training file ('builtin' = the built-in synthetic world's rows)
        eval="",                 # held-out JSONL / Parquet ('' = the last 5 % of the training split)
        dir="",                  # where TFDS writes ArrayRecord files ('' = WORKDIR/tfds)
        tokenizer="",            # .model, tokenizer.json or a checkpoint directory ('' = previous stage's, else trained)
        chat_template="",        # '' = the previous stage's / the tokenizer's, 'none', 'chatml', 'llama2', 'llama3', a .jinja
        fields="",               # column renames 'prompt:question,response:answer' (canonical:column)
        max_bad_rows=0,          # malformed rows skipped (counted in data_stats) before one is an error
        seq_len=seq_len,         # tokens per row (packed); 0 = from the data (longest example, up to model.max_len)
        max_prompt_len=max_prompt_len,      # prompts longer than this are cropped from the left
        max_response_len=max_response_len,  # responses longer than this are cropped from the right
        pack=True,               # pack several examples per row (attention never crosses them)
        builtin_size=4000,       # examples of the built-in corpus when data.train is 'builtin'
    ))


def _config_dir() -> str:
    """The stage configs: the installed package's copy (setup.py maps configs/ to instructgpt_jax.configs; an
    editable install maps it back to the repository's configs/), else the repository's, run uninstalled."""
    try:
        from instructgpt_jax import configs
        return os.path.dirname(os.path.abspath(configs.__file__))
    except ImportError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


CONFIG_DIR = _config_dir()


def stage_names() -> list[str]:
    """The stage configs there are ('sft', 'rm', ...): what `--config=STAGE:PRESET` accepts."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def config_path(spec: str) -> str:
    """'sft:tiny' -> '<CONFIG_DIR>/sft.py:tiny'; a spec naming a .py file is returned as it is."""
    path, sep, arg = spec.partition(":")
    if path.endswith(".py") or os.path.sep in path:
        return spec
    return os.path.join(CONFIG_DIR, f"{path}.py") + sep + arg


def load(spec: str, preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
    """The one config loader (tests, notebooks, the pipeline, the memory plan use it; main.py's --config
    flag is the same file): 'sft', 'configs/sft.py' or 'path/x.py:PRESET' -> `get_config(PRESET)`, with
    dotted-key overrides (`load('ppo', 'tiny', **{'ppo.kl_coef': 0.1})`; unknown keys are errors)."""
    import importlib.util
    path, _, arg = spec.partition(":")
    preset = preset if preset is not None else (arg or None)
    if not path.endswith(".py"):
        path = os.path.join(CONFIG_DIR, f"{path}.py")
    if not os.path.exists(path):
        raise ValueError(f"config {spec!r}: no file {path}; valid stage configs: {', '.join(stage_names())}")
    module_spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset is not None else module.get_config()
    return replace(config, **overrides) if overrides else config
