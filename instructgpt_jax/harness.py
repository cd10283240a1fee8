"""What every stage shares around its objective, so that a stage file is its loss, its batches and its config.

    run = harness.Stage(config, workdir)        # config resolved (the checkpoint's model, data keys checked), mesh
    data = prepare.prepare(run.config, ...)     # tokenizer, template, iterators (lengths / steps fitted to the data)
    manager = run.start(data, model)            # checkpoint manager (refuses a different config), startup summary
    ... train_lib.run_supervised(...) / train_lib.fit(...)   (interrupts: a checkpoint, then exit 130 / 143)
    run.export(params, data, step=...)          # the export the next stage adopts

`resolve` is also what `main.py --print_config` shows. Where a stage starts from, in order: its own checkpoints
(resume) -> the previous stage's export (`config.init.from_workdir`) -> a Hugging Face directory
(`config.init.hf_path`) -> scratch.
"""
from __future__ import annotations

import ctypes
import math
import os
import sys
from typing import Iterable, Optional

import jax
import ml_collections

from instructgpt_jax import checkpoints, config_lib, lora, sharding
from instructgpt_jax.errors import UserError

# Model keys a run may choose for itself whatever checkpoint it starts from (they change how, not what, it computes,
# or are the stage's own choice: PPO and DPO need dropout 0). Every other key comes from the checkpoint.
RUNTIME_MODEL_KEYS = ("preset", "dropout", "dtype", "remat", "scan_unroll", "causal_blocks", "logits_chunk")


def compute_keys(config: ml_collections.ConfigDict) -> dict:
    """The run's RUNTIME_MODEL_KEYS that say how a model computes (not preset, not dropout), for the other
    checkpoints a stage loads (PPO's reward model and the value model on its trunk): the run's remat, dtype and
    chunking apply to them too, not those they were trained with."""
    return {k: config.model[k] for k in RUNTIME_MODEL_KEYS if k not in ("preset", "dropout")}


# What each stage's data files hold, for the errors that ask for one.
_DATA = {"text": "{text} rows", "demonstrations": "{prompt, response} or {messages} rows",
         "comparisons": "{prompt, completions, ranks}, {prompt, chosen, rejected}, HH or UltraFeedback rows",
         "prompts": "{prompt} or {messages} rows"}
FITTED_DATA_KEYS = ("seq_len", "max_prompt_len", "max_response_len", "ptx_seq_len")  # 0 = measured on the data
STAGE_DATA = {"pretrain": "text", "sft": "demonstrations", "rm": "comparisons", "dpo": "comparisons",
              "simpo": "comparisons", "ppo": "prompts"}


def say(message: str) -> None:
    """One line of the run's own narration (process 0, stderr, next to the progress output)."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def checkpoint_model(config) -> tuple[Optional[dict], str]:
    """(model keys, where from) of the checkpoint a stage starts from: the previous stage's export
    (`config.init.from_workdir`), else a Hugging Face directory (`config.init.hf_path`); (None, '') if neither."""
    if config.init.from_workdir:
        export = checkpoints.Export.open(config.init.from_workdir)
        return export.model, export.path
    if config.init.hf_path:
        from instructgpt_jax import hf
        try:
            return hf.model_config_dict(config.init.hf_path), config.init.hf_path
        except FileNotFoundError as e:
            raise UserError(f"config.init.hf_path: {e}") from None
    return None, ""


def _require(config, key: str, kind: str, why: str = "") -> None:
    if not config.data.get(key):
        raise UserError(f"config.data.{key} is empty{why}: give a JSONL or Parquet file of {_DATA[kind]} "
                        f"(--config.data.{key}=FILE), or --config.data.{key}=builtin for the built-in synthetic world")


def check_data_paths(config) -> None:
    """Every data file a stage needs is named (or 'builtin'): nothing toy is ever used implicitly."""
    stage = config.stage
    if stage not in STAGE_DATA:
        return
    _require(config, "train", STAGE_DATA[stage])
    if stage == "ppo" and config.ppo.ptx_coef > 0:
        _require(config, "ptx", "text", f" but config.ppo.ptx_coef={config.ppo.ptx_coef} > 0 needs pretraining text "
                                        f"(or set --config.ppo.ptx_coef=0: plain PPO)")
    if stage == "rm" and not config.data.demonstrations:
        source = config.init.from_workdir and checkpoints.Export.open(config.init.from_workdir)
        if not (source and source.train_data):
            _require(config, "demonstrations", "demonstrations",
                     " and config.init.from_workdir names no SFT stage whose demonstrations fix the reward's bias")


def resolve(config: ml_collections.ConfigDict, explicit: Iterable[str] = (), strict: bool = True
            ) -> ml_collections.ConfigDict:
    """A copy of `config` as the stage will run it: `config.model` adopted from the checkpoint the stage starts
    from (all but RUNTIME_MODEL_KEYS), the checkpoint's tokenizer when none is given, data paths checked.
    `explicit`: the dotted keys the user set ('model.num_layers', ...); one that contradicts the checkpoint is an
    error naming both values. `strict=False` (--print_config) skips the checks that only matter to a run: data
    paths, and a finetune preset without a checkpoint. Idempotent, and reads only small files (no JAX work)."""
    config = ml_collections.ConfigDict(config.to_dict())
    keys, source = checkpoint_model(config)
    if keys is None and config.model.preset == config_lib.FROM_CHECKPOINT and strict:
        raise UserError(f"the '{config_lib.FINETUNE}' preset starts from a checkpoint: set "
                        f"--config.init.hf_path=DIR (a Hugging Face directory) or --config.init.from_workdir=RUN "
                        f"(a finished stage's workdir)")
    explicit = set(explicit)
    if "train.num_steps" in explicit and "train.num_epochs" not in explicit:
        config.train.num_epochs = 0.0  # a step count given on the command line wins over a preset's epochs
    for key, value in (keys or {}).items():
        if key in RUNTIME_MODEL_KEYS or key not in config.model:
            continue
        if f"model.{key}" in explicit and config.model[key] != value:
            raise UserError(f"--config.model.{key}={config.model[key]!r} contradicts the checkpoint {source} "
                            f"({key}={value!r}); drop the override (the model comes from the checkpoint)")
        config.model[key] = value
    hf_dir = config.init.hf_path
    if hf_dir and not config.init.from_workdir and "tokenizer" in config.data and not config.data.tokenizer:
        if not any(os.path.exists(os.path.join(hf_dir, f)) for f in checkpoints.TOKENIZER_FILES):
            raise UserError(f"{hf_dir} has no tokenizer ({' or '.join(checkpoints.TOKENIZER_FILES)}); set "
                            f"config.data.tokenizer to one whose ids match the checkpoint's vocabulary")
        config.data.tokenizer = hf_dir  # its chat template comes with it (data.chat_template '' = auto)
    if config.init.get("adapter"):  # a PEFT adapter fixes the adapters' shape and scale
        from instructgpt_jax import hf
        from instructgpt_jax.models import ModelConfig
        try:
            keys = hf.peft_lora_config(config.init.adapter, ModelConfig.from_config(config.model))
        except (ValueError, OSError) as e:
            raise UserError(f"config.init.adapter: {e}") from None
        for key, value in keys.items():
            if f"lora.{key}" in explicit and config.lora[key] != value:
                raise UserError(f"--config.lora.{key}={config.lora[key]!r} contradicts the adapter "
                                f"{config.init.adapter} ({key}={value!r}); drop the override")
            config.lora[key] = value
    lora.check_config(config)
    if strict:
        check_data_paths(config)
    return config


def count_params(model, mesh) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(sharding.model_abstract(model, mesh)))


def _family(model_cfg) -> str:
    from instructgpt_jax import hf
    try:
        return hf.hf_model_type(model_cfg)
    except ValueError:
        return model_cfg.arch


def _files(config, data) -> list[str]:
    """'key: file (N rows)' for each data file the stage reads."""
    out = []
    for key, attr in (("train", "train_source"), ("eval", "eval_source"), ("ptx", "ptx_source")):
        source = getattr(data, attr, None)
        if source is None or key not in config.data:
            continue
        name = config.data[key] or ("the last 5 % of train" if key == "eval" else "")
        out.append(f"{key} {name} ({len(source):,} rows)")
    for key, source in getattr(data, "extra_sources", {}).items():
        name = config.data.get(key) or "(the previous stage's training file)"
        out.append(f"{key} {name} ({len(source):,} rows)")
    return out


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax.monitoring's event after each XLA compilation
_trim = []  # glibc's malloc_trim once found, or None where libc has none


def trim_after_compiles() -> bool:
    """From now on, after every XLA compilation, return the heap the compiler freed to the OS (glibc's
    `malloc_trim(0)`). Else the allocator keeps it, and it adds to the process's peak while the compiled step runs:
    0.35 GB of a 2.6 GB QLoRA PPO-ptx iteration on SmolLM2-135M (benchmarks/memory.py). Idempotent; False (and
    nothing done) where libc has no malloc_trim (macOS, musl)."""
    if not _trim:
        try:
            _trim.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):
            _trim.append(None)
            return False
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, _seconds, **_: event == COMPILE_EVENT and _trim[0](0))
    return _trim[0] is not None


class Stage:
    """One stage's run: its resolved config, mesh, starting checkpoint, manager and export."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        trim_after_compiles()
        self.config = resolve(config)
        self.workdir = workdir
        # refuse a workdir of another config before any work (keys the data will fit are compared in `start`)
        fitted = [f"data.{k}" for k in FITTED_DATA_KEYS if self.config.data.get(k) == 0]
        checkpoints.check_workdir(workdir, self.config, ignore=fitted)
        self.mesh = sharding.make_mesh(self.config.mesh)
        sharding.batch_size_per_process(self.config.train.batch_size, self.mesh)
        self.source = checkpoints.previous_export(self.config)
        self.manager = None

    @property
    def resuming(self) -> bool:
        return self.manager is not None and self.manager.latest_step() is not None

    def start(self, data, model, weights: str = "") -> checkpoints.Manager:
        """The checkpoint manager (refusing a workdir of another config, after the data fitted the config's
        lengths and steps) and the startup summary. `weights`: where the weights come from, if not the usual."""
        config = self.config
        vocab = data.tokenizer.vocab_size
        if vocab > config.model.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens but config.model.vocab_size={config.model.vocab_size}; "
                            f"raise config.model.vocab_size")
        self.manager = checkpoints.Manager(self.workdir, config)
        self.summary(data, model, weights)
        return self.manager

    def weights(self) -> str:
        if self.resuming:
            return f"resuming {self.workdir} at step {self.manager.latest_step()}"
        if self.source:
            return f"the {self.source.stage} export {self.source.path}"
        if self.config.init.hf_path:
            return f"the Hugging Face checkpoint {self.config.init.hf_path}"
        return "scratch (random init)"

    def summary(self, data, model, weights: str = "") -> None:
        """What the stage starts from, on what, for how long, and where it writes: one short block."""
        config, mesh = self.config, self.mesh
        template = getattr(data.chat_template, "name", None) or "none"
        tok = data.tokenizer
        steps = f"{config.train.num_steps:,} steps of batch {config.train.batch_size}"
        if config.train.get("num_epochs", 0):
            steps += f" ({config.train.num_epochs:g} epochs)"
        fitted = {k: v for k, v in getattr(data, "fitted", {}).items() if "." in k}
        lines = [
            f"{config.stage}: {self.workdir}",
            f"  weights   {weights or self.weights()}",
            f"  model     {_family(model.cfg)}, {count_params(model, mesh) / 1e6:,.1f}M params, "
            f"{model.cfg.num_layers} layers x {model.cfg.d_model}, context {model.cfg.max_len}, {config.model.dtype}",
            f"  tokenizer {type(tok).__name__} ({tok.vocab_size:,} tokens, EOS ids {sorted(tok.eos_ids)}), "
            f"chat template {template}",
            *(f"  data      {f}" for f in _files(config, data)),
            *([f"  lora      rank {config.lora.rank}, alpha {config.lora.alpha:g}, targets {config.lora.targets}, "
               f"base {config.lora.base_dtype}: "
               f"{(count_params(model, mesh) - count_params(lora.plain(model), mesh)) / 1e6:,.2f}M adapter params "
               f"train, the base is frozen"] if lora.enabled(config) else []),
            f"  mesh      {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es)",
            f"  schedule  {steps}" + "".join(f", {k}={v}" for k, v in fitted.items()),
            f"  writes    checkpoints/ every {config.train.checkpoint_every} steps, metrics.jsonl, tb/, export/",
        ]
        say("\n".join(lines))

    def tasks(self, model, data, params_of=lambda state: state["params"]):
        """`train.eval_tasks`: lm-eval tasks on the current params (`params_of(train state)`) every
        `train.eval_tasks_every` steps and at the end, for `train_lib.fit(tasks_fn=...)`; None when none are
        asked for. Unknown tasks fail now, before any step."""
        if not self.config.train.get("eval_tasks", ""):
            return None
        from instructgpt_jax import eval as eval_lib  # lm-eval only when asked for
        return eval_lib.tasks_callback(self.config, model, data.tokenizer, data.chat_template, self.mesh, params_of)

    def export(self, params, data, name: str = checkpoints.EXPORT_DIR, base=None, **meta) -> str:
        """Params + meta.json (stage, model, data statistics, `meta`) + tokenizer and template: what later
        stages adopt. LoRA (`base`: the frozen base, `params` the trained adapters / heads): the merged
        params, and the adapters apart with their config (meta 'lora') for `hf --adapter`."""
        adapter = None
        if base is not None:
            adapter = lora.adapters(params)
            params = lora.merge(params, base, lora.model_config(self.config))
            meta["lora"] = lora.meta(self.config, self.lora_base())
        meta = {"stage": self.config.stage, "model": self.config.model.to_dict(), "data_stats": data.stats()
                if hasattr(data, "stats") else {}, **meta}
        return checkpoints.export(self.workdir, params, meta=meta, save_tokenizer=data.save_tokenizer, name=name,
                                  adapter=adapter)

    def adapter(self, model):
        """The adapters `config.init.adapter` (a PEFT directory) starts from, on the mesh; None when not set."""
        if not self.config.init.get("adapter"):
            return None
        from instructgpt_jax import hf
        return hf.load_peft_adapter(self.config.init.adapter, model, self.mesh)

    def lora_base(self) -> str:
        """The weights a LoRA run's adapters apply to: the previous export, else the Hugging Face checkpoint."""
        return self.source.path if self.source else self.config.init.hf_path
