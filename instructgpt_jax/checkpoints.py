"""Orbax checkpoints: resume a stage from its workdir, export params for the next stage.

Layout of a stage workdir:
    config.json      the config that created the checkpoints (checked on every resume)
    checkpoints/N/   train state (params, optimizer, step, rng, ...) + data iterator state (JSON)
    export/          params only + meta.json (model config, extras such as the RM bias) + the tokenizer
                     files (and chat_template.jinja) every later stage inherits

Restore order in a stage: resume from its own checkpoints -> init from the previous stage's
export -> scratch. Incompatible configs are refused before anything is written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp

from instructgpt_jax import sharding
from instructgpt_jax.errors import UserError

# Keys that may change between an interrupted run and its resumption without changing what
# the run computes (schedule length, logging, layout of devices).
RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.eval_tasks",
                  "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "mesh.",
                  "model.scan_unroll", "model.causal_blocks", "model.logits_chunk", "model.remat",
                  "ppo.ptx_microbatch")
# Keys newer than some workdirs: absent from an older config.json, they are no difference while they are off
# (the run computes what the older code did). Prefix -> "is off" for the current flat config.
ABSENT_WHILE_OFF = {"lora.": lambda cfg: not cfg.get("lora.rank"),
                    "init.adapter": lambda cfg: not cfg.get("init.adapter")}
EXPORT_DIR = "export"
ADAPTER_DIR = "adapter"  # a LoRA run's adapters, next to the merged params of its export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what an export or a Hugging Face directory holds
TEMPLATE_FILE = "chat_template.jinja"  # the chat template a run used, saved with its export


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(saved: dict, current: dict, ignore=RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ (ignoring keys that start with anything in `ignore`, and keys the saved
    config predates while they are off: ABSENT_WHILE_OFF)."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))

    def predates(k):
        return k not in a and any(k.startswith(p) and off(b) for p, off in ABSENT_WHILE_OFF.items())
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k.startswith(i) for i in ignore) and not predates(k)]


def write_json_atomic(path: str, obj: Any) -> None:
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def check_workdir(workdir: str, config: ml_collections.ConfigDict, ignore=()) -> None:
    """A workdir holding checkpoints of a different config is refused, listing the keys (`ignore`: keys still
    to be derived from the data, compared once they are)."""
    workdir = os.path.abspath(workdir)
    directory, cfg_path = os.path.join(workdir, "checkpoints"), os.path.join(workdir, "config.json")
    if os.path.exists(directory) and os.listdir(directory) and os.path.exists(cfg_path):
        with open(cfg_path) as f:
            diff = config_diff(json.load(f), json.loads(config.to_json()), RESUMABLE_KEYS + tuple(ignore))
        if diff:
            raise UserError(f"{workdir} holds checkpoints of a different config; nothing was changed. "
                            f"Use a new --workdir, or restore these keys:\n  " + "\n  ".join(diff))


class Manager:
    """A stage's CheckpointManager: async saves every N steps, keeps the last K, resumes exactly."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        check_workdir(self.workdir, config)
        os.makedirs(self.workdir, exist_ok=True)
        write_json_atomic(os.path.join(self.workdir, "config.json"), json.loads(config.to_json()))
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> Optional[int]:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        return self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """Restore onto the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with .sharding),
        which may be a different mesh from the one that saved. Returns (state, data_state)."""
        step = self._mgr.latest_step() if step is None else step
        restored = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                   data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def wait(self):
        self._mgr.wait_until_finished()

    def close(self):
        self._mgr.wait_until_finished()
        self._mgr.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export(workdir: str, params: Any, meta: dict, save_tokenizer: Optional[Any] = None, name: str = EXPORT_DIR,
           adapter: Any = None) -> str:
    """Params-only export (plus meta.json, and the tokenizer files `save_tokenizer(directory)` writes)
    that the next stage loads; `adapter`: a LoRA run's adapters too (ADAPTER_DIR, for `hf --adapter`).
    Written to a temporary directory and renamed, so an interrupted export never leaves a half-written one."""
    final = os.path.join(os.path.abspath(workdir), name)
    tmp = final + ".tmp"
    if jax.process_index() == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
    if adapter is not None:
        ckptr.save(os.path.join(tmp, ADAPTER_DIR), adapter)
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        if save_tokenizer is not None:
            save_tokenizer(tmp)
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    sync("export")
    return final


def export_path(path: str) -> str:
    """Accept a stage workdir or its export directory."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    if os.path.exists(os.path.join(path, EXPORT_DIR, "meta.json")):
        return os.path.join(path, EXPORT_DIR)
    raise UserError(f"{path}: no exported params here (expected {EXPORT_DIR}/meta.json); "
                            f"has that stage finished?")


def read_export_meta(path: str) -> dict:
    with open(os.path.join(export_path(path), "meta.json")) as f:
        return json.load(f)


def load_export(path: str, abstract_params: Any) -> Any:
    """Restore exported params onto the shardings carried by `abstract_params`."""
    path = export_path(path)
    return ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract_params)


def load_adapter(path: str) -> Any:
    """A LoRA export's adapters (host arrays, as saved), or None when the export has none."""
    path = os.path.join(export_path(path), ADAPTER_DIR)
    return ocp.StandardCheckpointer().restore(path) if os.path.exists(path) else None


def load_params(path: str, model, mesh) -> Any:
    """An export's params for `model` (a Flax module), straight into their shardings on `mesh`:
    the one way every stage and the evaluation put a previous stage's weights on the mesh."""
    return load_export(path, sharding.model_abstract(model, mesh))


def init_with_trunk(scalar_model, lm_model, mesh, rng, lm_export: Optional[str] = None) -> Any:
    """A scalar-head model's params (reward or value model): fresh, with every trunk weight taken from
    an LM export when given (its LM head, if untied, is dropped; the scalar head keeps its init)."""
    params = sharding.init_model(scalar_model, rng, mesh)
    if lm_export:
        lm = load_params(lm_export, lm_model, mesh)
        params = {k: lm[k] if k in lm else v for k, v in params.items()}
    return params


@dataclasses.dataclass(frozen=True)
class Export:
    """A finished stage's export: the one owner of what later stages adopt from it (its meta.json: stage,
    model config, step, data statistics, extras such as the RM bias; its params; its tokenizer files and
    the chat template it used; the training file it read)."""
    path: str
    meta: dict

    @classmethod
    def open(cls, path: str) -> "Export":
        """A stage workdir or its export directory (UserError when the stage has not finished)."""
        path = export_path(path)
        return cls(path, read_export_meta(path))

    @property
    def stage(self) -> str:
        return self.meta.get("stage", "?")

    @property
    def model(self) -> dict:
        return self.meta["model"]

    @property
    def has_tokenizer(self) -> bool:
        return any(os.path.exists(os.path.join(self.path, f)) for f in TOKENIZER_FILES)

    @property
    def template_file(self) -> Optional[str]:
        path = os.path.join(self.path, TEMPLATE_FILE)
        return path if os.path.exists(path) else None

    @property
    def train_data(self) -> str:
        return stage_train_data(self.path)

    def params(self, model, mesh) -> Any:
        return load_params(self.path, model, mesh)

    def __str__(self) -> str:
        return f"{self.path} ({self.stage}, step {self.meta.get('step', '?')})"


def previous_export(config) -> Optional[Export]:
    """The export of the stage this one starts from (`config.init.from_workdir`), or None."""
    return Export.open(config.init.from_workdir) if config.init.from_workdir else None


def stage_train_data(path: str) -> str:
    """The training file a finished stage read (its config.json's data.train), or the built-in rows it
    wrote (data.train 'builtin'), else ''. Accepts the stage's workdir or its export directory."""
    workdir = os.path.abspath(path)
    if os.path.basename(workdir).startswith(EXPORT_DIR):
        workdir = os.path.dirname(workdir)
    cfg_path = os.path.join(workdir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            train = json.load(f).get("data", {}).get("train", "")
        if train and train != "builtin":
            return train
    builtin = os.path.join(workdir, "builtin_data", "demonstrations_train.jsonl")
    return builtin if os.path.exists(builtin) else ""


def sync(name: str) -> None:
    if jax.process_count() > 1:
        jax.experimental.multihost_utils.sync_global_devices(name)
