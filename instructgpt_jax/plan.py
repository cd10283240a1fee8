"""Memory plan: per-device bytes of a stage on a mesh, from shapes alone (nothing is allocated).

    python -m instructgpt_jax.plan --config=configs/ppo.py:175b --mesh=1,64,8 --device_memory_gb=80
    python -m instructgpt_jax.plan --config=configs/sft.py:1.3b --mesh=1,8,1 --stage=rm
    python -m instructgpt_jax.plan --config=configs/ppo.py:llama3-8b --mesh=1,1,1 --rm_preset=llama3-8b \
        --config.lora.rank=16 --config.lora.base_dtype=nf4   # QLoRA
    python -m instructgpt_jax.plan --table          # the README tables

Param shapes come from `jax.eval_shape(model.init)`, their per-device shards from the same
logical-axis rules the stages use (`sharding.param_shardings`) on a `jax.sharding.AbstractMesh`,
so any mesh can be planned on a laptop. What is counted, per device:

  params       float32 (master copies; bf16 compute casts them on the fly)
  optimizer    Adam mu + nu, float32, sharded like the params
  gradients    float32, sharded like the params
  kv_cache     PPO rollouts: rows x (prompt + response) x layers x 2 (k, v) x kv_heads x head_dim x
               compute-dtype bytes; rows over the batch axes (data x fsdp), heads over tensor
  activations  a rough estimate of what the backward pass keeps, per microbatch (see `activations`)
               plus two layers of all-gathered params (FSDP gathers one layer at a time and prefetches)

PPO-ptx holds policy (trainable), reference (params), optional policy EMA (params), reward model
(params) and value model (trainable, RM-sized); rollout (kv_cache) and update (activations) are
different phases, so its peak is the resident state plus the larger of the two.

LoRA / QLoRA (`config.lora.rank` > 0, see `lora_shards`): each model is a frozen base whose blocks'
projection kernels are stored in `config.lora.base_dtype` (float32 4 bytes, bfloat16 2, int8 1 + a float32
scale per output channel, nf4 0.5 + a float32 absmax per block of 64; everything else float32), plus
float32 adapters A [in, r] and B [r, out] on the targeted projections; gradients and Adam state exist for
the adapters (and a reward / value model's scalar head) only. Nothing is copied: DPO's and PPO's reference
is the policy base with its adapters off, the policy EMA covers the adapters only, and the value model is
adapters + its own scalar head on the reward model's base. Activations and KV cache are as without LoRA.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh

from instructgpt_jax import config_lib, sharding
from instructgpt_jax.lora import BASE_DTYPES, PROJECTIONS  # the stages' own tables
from instructgpt_jax.models import ModelConfig, Transformer, transformer
from instructgpt_jax.models.quant import BLOCK as NF4_BLOCK

GIB = 2 ** 30
HEADROOM = 0.9  # a plan fits when it needs at most 90 % of device memory (XLA scratch, fragmentation)


def stage_config(stage: str, preset: str) -> ml_collections.ConfigDict:
    """`configs/<stage>.py:<preset>` (config_lib.load)."""
    return config_lib.load(stage, preset)


def abstract_mesh(shape) -> AbstractMesh:
    return AbstractMesh(tuple(int(s) for s in shape), sharding.MESH_AXES)


@functools.cache
def _abstract_params(cfg: ModelConfig, head: str):
    """Boxed abstract params (shapes + logical axes) of a model: eval_shape once per model."""
    model = Transformer(cfg, head=head)
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], jax.random.PRNGKey(0))


def param_shards(cfg: ModelConfig, head: str, mesh: AbstractMesh) -> tuple[int, int]:
    """(total params, params held by one device) for `cfg` on `mesh`; raises the stages' own
    divisibility error when a mesh axis does not divide a sharded dimension."""
    abstract = _abstract_params(cfg, head)
    shapes = nn.unbox(abstract)
    shardings = sharding.logical_to_shardings(nn.get_partition_spec(abstract), shapes, mesh)
    leaves = list(zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
    return (sum(math.prod(x.shape) for x, _ in leaves),
            sum(math.prod(s.shard_shape(x.shape)) for x, s in leaves))


# ----------------------------------------------------------------------------- LoRA / QLoRA

def lora_modules(arch: str, targets: str) -> tuple:
    """The projection modules ('query', 'wo', ...) `targets` ('all-linear' or a comma list of q, k, v, o,
    gate, up, down) adapts: `models.transformer.lora_modules`, the model's own choice."""
    modules = transformer.lora_modules(ModelConfig(arch=arch, lora_targets=targets))
    return tuple(dict.fromkeys(m.split("/")[1] for m in modules))


@dataclasses.dataclass(frozen=True)
class LoraShards:
    """Per-device sizes of a LoRA model: `base_bytes` of the frozen base (quantised block projections and
    their scales, everything else float32, the scalar head included), `adapters` (A and B params) and
    `head` (scalar-head params, trainable in a reward / value model); `total_adapters` over all devices."""
    base_bytes: int
    adapters: int
    head: int
    total_adapters: int


def _base_kernel_bytes(shape: tuple, shard_shape: tuple, n_in: int, base_dtype: str) -> int:
    """Bytes one device holds of a [layers, *in, *out] projection kernel (`shard_shape` of it per device)
    stored as `base_dtype`. Codes and scales shard like the kernel (lora.store_base), except that nf4's
    absmax [layers, in / 64, *out] keeps its block axis whole: every device holds all blocks of its outputs."""
    n = math.prod(shard_shape)
    layers, outs = shard_shape[0], math.prod(shard_shape[1 + n_in:])
    if base_dtype == "float32":
        return 4 * n
    if base_dtype == "bfloat16":
        return 2 * n
    if base_dtype == "int8":
        return n + 4 * layers * outs  # int8 codes + a float32 scale per output channel
    blocks = math.prod(shape[1:1 + n_in]) // NF4_BLOCK
    return -(-n // 2) + 4 * layers * blocks * outs  # two nf4 codes a byte + a float32 absmax per block


def lora_shards(cfg: ModelConfig, head: str, mesh: AbstractMesh, rank: int, targets: str = "all-linear",
                base_dtype: str = "float32") -> LoraShards:
    """Per-device sizes of `cfg` as a frozen base in `base_dtype` with rank-`rank` adapters on `targets`.

    Adapters shard like the kernel they adapt on its other axes (A [layers, *in, r] like its inputs,
    B [layers, r, *out] like its outputs; the rank is never split), base codes and scales like the kernel."""
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"config.lora.base_dtype={base_dtype!r}; valid: {', '.join(BASE_DTYPES)}")
    if rank < 1:
        raise ValueError(f"config.lora.rank={rank}: LoRA needs rank >= 1 (0 = full fine-tuning)")
    adapted = lora_modules(cfg.arch, targets)
    abstract = _abstract_params(cfg, head)
    shapes = nn.unbox(abstract)
    shardings = sharding.logical_to_shardings(nn.get_partition_spec(abstract), shapes, mesh)
    base = adapters = head_params = total = 0
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
        keys = [getattr(k, "key", str(k)) for k in path]
        shard = tuple(s.shard_shape(x.shape))
        if keys[0] == "layers" and keys[-1] == "kernel" and keys[-2] in PROJECTIONS:
            n_in = PROJECTIONS[keys[-2]]
            if base_dtype == "nf4" and (math.prod(x.shape[1:1 + n_in]) % NF4_BLOCK or x.shape[-1] % 2):
                raise ValueError(f"{'/'.join(keys)} {tuple(x.shape)}: nf4 needs an input width that is a multiple "
                                 f"of {NF4_BLOCK} and an even last axis; use config.lora.base_dtype=int8")
            base += _base_kernel_bytes(x.shape, shard, n_in, base_dtype)
            if keys[-2] in adapted:
                total += x.shape[0] * rank * (math.prod(x.shape[1:1 + n_in]) + math.prod(x.shape[1 + n_in:]))
                adapters += shard[0] * rank * (math.prod(shard[1:1 + n_in]) + math.prod(shard[1 + n_in:]))
        else:
            base += 4 * math.prod(shard)
            if keys[0] == "scalar_head":
                head_params += math.prod(shard)
    return LoraShards(base, adapters, head_params, total)


def activations(cfg: ModelConfig, rows: int, seq: int, mesh: AbstractMesh, lm_head: bool = True,
                grad: bool = True) -> int:
    """Rough bytes the backward pass keeps for `rows` sequences of `seq` tokens on one device.

    Per layer and token, without remat: the two norms' inputs and outputs (4 d_model), q, k, v and
    the attention output (4 d_model / tensor), the attention scores and probabilities
    (2 heads x seq / tensor) and the MLP's hidden tensors (2 mlp / tensor; the gated llama MLP keeps
    4: gate, up, the activation and the product), in the compute dtype. remat='full' keeps only each
    block's input (d_model) plus one block being recomputed; 'dots' keeps the projections' outputs
    (2 d_model + (3 d_model + mlp) / tensor) plus one block. LM logits and their gradient add
    2 x vocab / tensor float32 per token (of one chunk of about `logits_chunk` tokens over the rows when
    the losses chunk the LM head: `scoring.token_stats`); with fsdp > 1, two layers of all-gathered
    float32 params (still split over tensor) come on top. `grad=False`: a forward pass inside the
    same step that nothing differentiates (DPO's frozen reference): one block's and one logits
    chunk's working set, nothing kept.
    """
    t, e, h = sharding.tensor_parallel_size(mesh), jnp.dtype(cfg.dtype).itemsize, cfg.d_model
    hidden = (4 if cfg.arch == "llama" else 2) * cfg.mlp_dim
    full_layer = 4 * h + (4 * h + hidden + 2 * cfg.num_heads * seq) / t
    kept = {"none": full_layer, "full": h, "dots": 2 * h + (3 * h + cfg.mlp_dim) / t}[cfg.remat]
    layers = (cfg.num_layers * kept + (0 if cfg.remat == "none" else full_layer)) if grad else full_layer
    attn = 2 * h * cfg.head_dim * (cfg.num_heads + cfg.num_kv_heads)  # q, out + k, v
    mlp = (3 if cfg.arch == "llama" else 2) * h * cfg.mlp_dim
    gathered = 2 * 4 * (attn + mlp) / t if sharding.param_shard_count(mesh) > 1 else 0  # FSDP gathers a layer, prefetches the next
    chunk = max(1, cfg.logits_chunk // max(rows, 1)) if cfg.logits_chunk else seq  # positions of each row per chunk
    logits = 4 * 2 * cfg.vocab_size / t * min(seq, chunk) if lm_head else 0
    return int(rows * (seq * e * layers + logits) + gathered)


def kv_cache(cfg: ModelConfig, rows: int, length: int, tensor: int = 1) -> int:
    """KV cache bytes on one device: `rows` sequences of `length` slots, kv heads split over `tensor`."""
    return int(rows * length * cfg.num_layers * 2 * (cfg.num_kv_heads // tensor) * cfg.head_dim
               * jnp.dtype(cfg.dtype).itemsize)


@dataclasses.dataclass
class Plan:
    """Per-device bytes: `resident` parts are held throughout, `phases` at different times."""
    stage: str
    mesh: tuple
    resident: dict
    phases: dict
    notes: list

    @property
    def total(self) -> int:
        return sum(self.resident.values()) + max(self.phases.values(), default=0)

    def fits(self, memory_gib: float) -> bool:
        return self.total <= HEADROOM * memory_gib * GIB

    def report(self, memory_gib: float) -> str:
        d, f, t = self.mesh
        lines = [f"{self.stage} on mesh data={d} fsdp={f} tensor={t} ({d * f * t} devices), per device:"]
        for name, b in list(self.resident.items()) + list(self.phases.items()):
            lines.append(f"  {name:<28} {b / GIB:10.2f} GiB")
        verdict = "fits" if self.fits(memory_gib) else "does NOT fit"
        lines.append(f"  {'peak':<28} {self.total / GIB:10.2f} GiB: {verdict} in {memory_gib:g} GiB "
                     f"(using at most {HEADROOM:.0%})")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def ptx_microbatch(config, mesh_shape) -> int:
    """Pretraining rows per gradient micro-batch of a PPO-ptx update: `config.ppo.ptx_microbatch`, or (0) automatic:
    micro-batches of the largest divisor of `ptx_batch_size` within `minibatch_size` when the activations they save
    (this plan's estimate, per device) outweigh the float32 gradient accumulator they add (the trainable params per
    device: always with LoRA; at full fine-tuning only when the ptx rows' activations exceed the model's size),
    else the whole batch at once. `config`: resolved (the stage's `run.config`)."""
    ppo, rows = config.ppo, config.ppo.ptx_batch_size
    if ppo.get("ptx_microbatch", 0) or ppo.get("ptx_coef", 0) <= 0:
        return ppo.get("ptx_microbatch", 0) or rows
    micro = max(d for d in range(1, min(rows, ppo.minibatch_size) + 1) if rows % d == 0)
    mesh, policy = abstract_mesh(mesh_shape), _model(config.model)
    shards = sharding.data_parallel_size(mesh)
    seq = config.data.get("ptx_seq_len", 0) or policy.max_len
    saved = (activations(policy, -(-rows // shards), seq, mesh) -
             activations(policy, -(-micro // shards), seq, mesh))
    rank = int(config.get("lora", {}).get("rank", 0) or 0)
    trainable = (lora_shards(policy, "lm", mesh, rank, config.lora.targets, config.lora.base_dtype).adapters if rank
                 else param_shards(policy, "lm", mesh)[1])
    return micro if saved > 4 * trainable else rows


def _model(model_cfg, **overrides) -> ModelConfig:
    return ModelConfig.from_config({**dict(model_cfg), **overrides})


def _rows(n: int, mesh, what: str) -> int:
    shards = sharding.data_parallel_size(mesh)
    if n % shards:
        raise ValueError(f"{what}={n} is not divisible by data x fsdp = {shards}: every device needs whole rows")
    return n // shards


def plan(config, mesh_shape, *, stage: str | None = None, rm_preset: str | None = None,
         batch: int | None = None, seq_len: int | None = None, sample_batch: int | None = None,
         micro_rows: int | None = None) -> Plan:
    """Per-device memory of `stage` (default config.stage) for `config` on a (data, fsdp, tensor) mesh.

    batch: global batch (prompts for RM and PPO); default config.train.batch_size.
    micro_rows: rows per device per microbatch (default: the batch split over data x fsdp and
      config.train.grad_accum; the RL stage does not accumulate, so 'ppo' ignores it). sample_batch: rows
      sampled at once (default config.ppo.rollout_chunk, else the minibatch). Critic-free RL
      (advantage_estimator != 'gae') holds no value model; a verifier reward no RM.
    The model is the checkpoint's when the config starts from one (`config.init.hf_path` or `.from_workdir`,
    as the stage adopts it: `harness.resolve`), and PPO's reward / value model is `config.ppo.rm_workdir`'s.
    """
    from instructgpt_jax import checkpoints, harness
    config = harness.resolve(config, strict=False)
    stage = stage or config.stage
    stage = "sft" if stage == "pretrain" else stage
    mesh = abstract_mesh(mesh_shape)
    policy = _model(config.model)
    batch = batch or config.train.batch_size
    accum = 1 if stage == "ppo" else config.train.get("grad_accum", 1)  # ppo.check_config refuses grad_accum > 1
    resident, phases, notes = {}, {}, []
    lora = config.get("lora") or {}
    rank = int(lora.get("rank", 0) or 0)

    def lora_model(cfg, head):
        return lora_shards(cfg, head, mesh, rank, lora.get("targets", "all-linear"),
                           lora.get("base_dtype", "float32"))

    def trainable(name, cfg, head):
        if rank:  # a frozen base, trainable adapters (and scalar head)
            s = lora_model(cfg, head)
            resident.update({f"{name} base params": s.base_bytes, f"{name} adapter params": 4 * s.adapters,
                             f"{name} gradients": 4 * (s.adapters + s.head),
                             f"{name} Adam mu+nu": 8 * (s.adapters + s.head)})
            return s
        _, n = param_shards(cfg, head, mesh)
        resident.update({f"{name} params": 4 * n, f"{name} gradients": 4 * n, f"{name} Adam mu+nu": 8 * n})

    used = []

    def micro(rows):  # rows per device per microbatch
        n = -(-_rows(rows, mesh, "batch") // accum)  # checks the batch splits over data x fsdp
        used.append(micro_rows or n)
        return used[-1]

    if stage == "sft":
        seq = seq_len or config.data.seq_len
        trainable("model", policy, "lm")
        phases["activations"] = activations(policy, micro(batch), seq, mesh)
    elif stage == "rm":
        seq, k = seq_len or config.data.seq_len, config.data.get("max_k", 9)
        trainable("reward model", policy, "scalar")
        phases["activations"] = activations(policy, k * micro(batch), seq, mesh, lm_head=False)
        notes.append(f"each prompt runs its {k} completions through the model: {k} rows per prompt")
    elif stage == "dpo":
        seq, k = seq_len or config.data.seq_len, config.data.get("max_k", 9)
        trainable("policy", policy, "lm")
        if not rank:  # LoRA: the reference is the policy base with the adapters off
            resident["reference params"] = 4 * param_shards(policy, "lm", mesh)[1]
        rows = k * micro(batch)
        phases["activations"] = activations(policy, rows, seq, mesh) + activations(policy, rows, seq, mesh, grad=False)
        notes.append(f"policy and frozen reference run each prompt's {k} completions: {k} rows per prompt")
    elif stage == "ppo":
        ppo = config.get("ppo", ml_collections.ConfigDict())
        critic_free = ppo.get("advantage_estimator", "gae") != "gae"
        uses_rm = ppo.get("reward", "rm") == "rm" or not critic_free
        prompt = config.data.get("max_prompt_len", policy.max_len // 2)
        seq = seq_len or prompt + ppo.get("max_new_tokens", policy.max_len - prompt)
        rm_model = config_lib.model_config(rm_preset) if rm_preset else None
        if ppo.get("rm_workdir", "") and not rm_preset:  # the reward model the stage will load
            rm_model, rm_preset = checkpoints.read_export_meta(ppo.rm_workdir)["model"], ppo.rm_workdir
        rm_cfg = policy if rm_model is None else _model(  # the policy's dtype and remat (and tokenizer)
            rm_model, vocab_size=max(policy.vocab_size, rm_model["vocab_size"]), dtype=policy.dtype,
            remat=policy.remat)
        if rank:  # one policy base (the reference too), one RM base (the value model's trunk too)
            pol = trainable("policy", policy, "lm")
            if ppo.get("ema_decay", 0.0) > 0:
                resident["policy EMA adapter params"] = 4 * pol.adapters
            if uses_rm:
                rm = lora_model(rm_cfg, "scalar")
                resident["reward model base params"] = rm.base_bytes
            if not critic_free:  # on the RM's base; with a verifier, on the policy's base
                v = rm if uses_rm else lora_model(policy, "scalar")
                resident.update({"value adapter params": 4 * v.adapters, "value head params": 4 * v.head,
                                 "value gradients": 4 * (v.adapters + v.head),
                                 "value Adam mu+nu": 8 * (v.adapters + v.head)})
        else:
            trainable("policy", policy, "lm")
            resident["reference params"] = 4 * param_shards(policy, "lm", mesh)[1]
            if ppo.get("ema_decay", 0.0) > 0:
                resident["policy EMA params"] = resident["reference params"]
            if uses_rm:
                resident["reward model params"] = 4 * param_shards(rm_cfg, "scalar", mesh)[1]
            if not critic_free:
                trainable("value", rm_cfg, "scalar")
        if critic_free:
            notes.append(f"critic-free ({ppo.advantage_estimator}): no value model, its params, optimizer and "
                         f"forward passes are saved")
        chunk = ppo.get("rollout_chunk", 0) or ppo.get("minibatch_size", batch)
        sample_rows = _rows(sample_batch or chunk, mesh, "sample batch")
        phases["kv_cache (rollout)"] = kv_cache(policy, sample_rows, seq, sharding.tensor_parallel_size(mesh))
        minibatch, ptx = ppo.get("minibatch_size", batch), ppo.get("ptx_batch_size", 0) * (ppo.get("ptx_coef", 0) > 0)
        ptx_micro = ptx and ptx_microbatch(config, mesh_shape)
        # the update is two programs: the policy's (its RL rows, whose block inputs stay for their backward, and
        # one ptx micro-batch at a time), then the value model's
        phases["activations (policy update)"] = activations(policy, micro(minibatch + ptx_micro), seq, mesh)
        if not critic_free:
            phases["activations (value update)"] = activations(rm_cfg, micro(minibatch), seq, mesh, lm_head=False)
        notes.append(f"reward / value model: {rm_preset or config.model.preset}; rollout and update are "
                     f"separate phases (peak = resident + the larger)")
    else:
        raise ValueError(f"stage {stage!r}: valid stages are sft, pretrain, rm, dpo, ppo")
    if rank:
        targets = lora.get("targets", "all-linear")
        notes.append(f"LoRA rank {rank} on {targets} ({', '.join(lora_modules(policy.arch, targets))}), the frozen "
                     f"base's block projections in {lora.get('base_dtype', 'float32')}: gradients and Adam state for "
                     f"the adapters (and a scalar head) only; no reference or value-trunk copies (see lora_shards)")
    notes.append(f"activations: {seq}-token rows, remat={policy.remat!r}, compute dtype {policy.dtype}, "
                 f"batch rows per device per microbatch: {max(used)} (rough: see plan.activations)")
    return Plan(stage, tuple(mesh_shape), resident, phases, notes)


# ----------------------------------------------------------------------------- the README table

DEVICES = {"80 GB GPU": 80, "TPU v4 (32 GiB)": 32, "TPU v5p (95 GiB)": 95}
TABLE_STAGES = (("SFT", "sft"), ("RM", "rm"), ("PPO-ptx", "ppo"))


def smallest_mesh(stage: str, preset: str, memory_gib: float, rm_preset: str = "6.7b", max_devices: int = 4096,
                  max_tensor: int = 8, pad_vocab: int = 128):
    """Smallest power-of-two (1, fsdp, tensor) mesh on which `stage` fits, preferring less tensor
    parallelism; with remat='full', bfloat16 compute, one row (RM: one prompt) per device per microbatch
    and PPO rollouts sampled one prompt per device at a time. Returns (mesh, plan) or None."""
    config = stage_config(stage, preset)
    config.model.remat, config.model.dtype = "full", "bfloat16"
    if pad_vocab:  # tensor parallelism shards the vocab: GPT's 50257 must be padded (e.g. to 50304)
        config.model.vocab_size = -(-config.model.vocab_size // pad_vocab) * pad_vocab
    rm = rm_preset if stage == "ppo" else None
    n = 1
    while n <= max_devices:
        for t in (1, 2, 4, 8, 16, 32):
            if t > min(n, max_tensor):
                break
            f = n // t
            try:
                p = plan(config, (1, f, t), rm_preset=rm, micro_rows=1, sample_batch=f)
            except ValueError:  # a dim the mesh does not divide, or the batch too small for fsdp
                continue
            if p.fits(memory_gib):
                return (1, f, t), p
        n *= 2
    return None


def table(presets=("1.3b", "6.7b", "175b"), rm_preset: str = "6.7b") -> str:
    """Markdown: for each stage and policy size, the smallest mesh that fits each device."""
    head = "| stage | policy | " + " | ".join(DEVICES) + " |"
    lines = [head, "|" + "---|" * (2 + len(DEVICES))]
    for label, stage in TABLE_STAGES:
        for preset in presets:
            cells = []
            for mem in DEVICES.values():
                found = smallest_mesh(stage, preset, mem, rm_preset)
                if found is None:
                    cells.append("does not fit")
                else:
                    (_, f, t), p = found
                    cells.append(f"{f * t} = fsdp {f}" + (f" x tensor {t}" if t > 1 else "")
                                 + f" ({p.total / GIB:.0f} GiB)")
            model = preset + (f" (RM/value {rm_preset})" if stage == "ppo" else "")
            lines.append(f"| {label} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# LoRA / QLoRA rows: Llama-3-8B PPO-ptx (reward / value model Llama-3-8B too) on fixed meshes
LORA_DEVICES = {"one 80 GB GPU (mesh 1,1,1)": ((1, 1, 1), 80), "TPU v5e-8, 8 x 16 GiB (mesh 1,8,1)": ((1, 8, 1), 16)}
LORA_METHODS = (
    ("full fine-tuning", {}),
    ("LoRA r=16, all-linear, float32 base", {"lora.rank": 16, "lora.base_dtype": "float32"}),
    ("LoRA r=16, all-linear, bfloat16 base", {"lora.rank": 16, "lora.base_dtype": "bfloat16"}),
    ("QLoRA r=16, all-linear, nf4 base", {"lora.rank": 16, "lora.base_dtype": "nf4"}),
)


def lora_plan(preset: str, overrides: dict, mesh_shape, *, prompt_len: int = 1024, response_len: int = 1024) -> Plan:
    """PPO-ptx of `preset` (reward / value model the same preset) with `overrides` (config.lora keys) on
    `mesh_shape`, as the table assumes: remat='full', bfloat16 compute, one row per device per microbatch,
    rollouts sampled one prompt per device at a time, prompts of `prompt_len` + responses of `response_len`."""
    config = config_lib.replace(stage_config("ppo", preset), **{
        "model.remat": "full", "model.dtype": "bfloat16", "data.max_prompt_len": prompt_len,
        "ppo.max_new_tokens": response_len, **overrides})
    rows = sharding.data_parallel_size(abstract_mesh(mesh_shape))
    return plan(config, mesh_shape, micro_rows=1, sample_batch=rows)


def lora_table(preset: str = "llama3-8b") -> str:
    """Markdown: full fine-tuning, LoRA and QLoRA PPO-ptx of `preset` on one GPU and on a TPU v5e-8."""
    lines = [f"| PPO-ptx, {preset} (RM/value {preset}) | " + " | ".join(LORA_DEVICES) + " |",
             "|" + "---|" * (1 + len(LORA_DEVICES))]
    for label, overrides in LORA_METHODS:
        cells = []
        for mesh, mem in LORA_DEVICES.values():
            p = lora_plan(preset, overrides, mesh)
            cells.append(f"{'fits' if p.fits(mem) else 'does not fit'} ({p.total / GIB:.0f} GiB)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line

def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if FLAGS.table:
        print(table(rm_preset=FLAGS.rm_preset or "6.7b"))
        print()
        print(lora_table())
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (or --table)")
    config = _CONFIG.value
    stage = FLAGS.stage or config.stage
    if stage != config.stage and (stage != "sft" or config.stage != "pretrain"):
        other = stage_config(stage, config.model.preset)  # that stage's keys, this config's model (and LoRA)
        other.model = config.model
        if "lora" in config:
            other.lora = config.lora
        config = other
    try:
        mesh = tuple(int(x) for x in FLAGS.mesh.split(","))
        if len(mesh) != 3 or min(mesh) < 1:
            raise ValueError
    except ValueError:
        raise app.UsageError(f"--mesh={FLAGS.mesh!r}: expected data,fsdp,tensor, e.g. 1,64,8") from None
    full_size = config.model.preset in config_lib.PRESETS and not config_lib.is_cpu_preset(config.model.preset)
    rm_preset = FLAGS.rm_preset or ("6.7b" if stage == "ppo" and full_size and not config.get("ppo", {}).get(
        "rm_workdir", "") else None)
    try:
        p = plan(config, mesh, stage=stage, rm_preset=rm_preset, batch=FLAGS.batch, seq_len=FLAGS.seq_len,
                 sample_batch=FLAGS.sample_batch, micro_rows=FLAGS.micro_rows)
    except ValueError as e:  # the stages' own error: this mesh would not run at all
        raise SystemExit(f"{stage} cannot run on mesh {FLAGS.mesh}: {e}") from None
    print(p.report(FLAGS.device_memory_gb))


if __name__ == "__main__":  # flags only as a command: main.py defines --config too, and both get imported
    from absl import app, flags, logging
    from ml_collections import config_flags

    FLAGS = flags.FLAGS
    _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<stage>.py:<preset>", lock_config=False)
    flags.DEFINE_string("mesh", "1,8,1", "data,fsdp,tensor mesh sizes")
    flags.DEFINE_float("device_memory_gb", 80, "memory of one device, GiB")
    flags.DEFINE_enum("stage", None, ["sft", "pretrain", "rm", "dpo", "ppo"], "stage to plan (default config.stage)")
    flags.DEFINE_string("rm_preset", None, "PPO: reward / value model preset (default 6.7b for full-size policies)")
    flags.DEFINE_integer("batch", None, "global batch (prompts for RM / PPO); default config.train.batch_size")
    flags.DEFINE_integer("seq_len", None, "tokens per row; default from config.data")
    flags.DEFINE_integer("sample_batch", None, "PPO: prompts sampled at once (default the batch)")
    flags.DEFINE_integer("micro_rows", None, "rows per device per microbatch (default from batch and grad_accum)")
    flags.DEFINE_bool("table", False, "print the README table and exit")
    app.run(main)
