"""Supervised fine-tuning (and pretraining: the same loss over every token).

Reads top to bottom: mesh -> data -> init -> step -> loop -> save.
`train(config, workdir)` is what `main.py` calls for `config.stage in ('sft', 'pretrain')`.
"""
from __future__ import annotations

import functools
import os

import jax
import ml_collections

from instructgpt_jax import checkpoints, losses, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import ModelConfig, Transformer


def loss_fn(params, batch, rng, frozen=None, *, model):
    """Token cross-entropy on loss_mask (response tokens for SFT, every token for pretraining)."""
    del frozen
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         deterministic=rng is None, rngs=None if rng is None else {"dropout": rng})
    loss, aux = losses.sft_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"accuracy": aux["accuracy"], "weight": aux["num_tokens"]}


def from_hf_checkpoint(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.init.hf_path set: config.model follows the checkpoint's config.json, and the checkpoint's
    own tokenizer (tokenizer.model or tokenizer.json) becomes the tokenizer unless one is given."""
    from instructgpt_jax import hf
    config = hf.with_checkpoint_model(config)
    if not config.data.tokenizer:
        if not any(os.path.exists(os.path.join(config.init.hf_path, f)) for f in prepare.TOKENIZER_FILES):
            raise UserError(f"{config.init.hf_path} has no tokenizer (tokenizer.model or tokenizer.json); "
                            f"set config.data.tokenizer to one whose ids match the checkpoint's vocabulary")
        config.data.tokenizer = config.init.hf_path  # its chat template comes with it (data.chat_template 'auto')
    return config


def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Run the stage; returns the final metrics. Resumes from `workdir` if it holds checkpoints.
    `builtin_data(kind, n, seed, split) -> rows` stands in for empty data paths (see data.prepare)."""
    if config.init.hf_path:
        config = from_hf_checkpoint(config)
    # --- mesh
    mesh = sharding.make_mesh(config.mesh)
    sharding.batch_size_per_process(config.train.batch_size, mesh)
    manager = checkpoints.Manager(workdir, config)  # refuses an incompatible workdir before any work

    # --- data
    data = prepare.prepare(config, workdir, "text" if config.stage == "pretrain" else "demonstrations", builtin_data)
    model_cfg = ModelConfig.from_config(config.model)
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"tokenizer has {data.tokenizer.vocab_size} tokens but config.model.vocab_size="
                        f"{model_cfg.vocab_size}; raise config.model.vocab_size")

    # --- init: resume from this workdir -> previous stage's export -> Hugging Face checkpoint -> scratch
    model = Transformer(model_cfg)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    source = checkpoints.previous_export(config)
    if manager.latest_step() is not None:
        params = sharding.init_model(model, rng, mesh)  # only a template: the restore overwrites it
    elif source:
        params = checkpoints.load_params(source, model, mesh)
    elif config.init.hf_path:
        from instructgpt_jax import hf
        _, params = hf.load_pretrained(config.init.hf_path, mesh=mesh)
    else:
        params = sharding.init_model(model, rng, mesh)

    # --- step + loop: the generic train step on this stage's loss, the shared loop
    state, last = train_lib.run_supervised(
        config=config, workdir=workdir, mesh=mesh, manager=manager, params=params, tx=tx, data=data, rng=rng,
        loss_fn=functools.partial(loss_fn, model=model),
        units_per_step=config.train.batch_size * config.data.seq_len)

    # --- save: params-only export for the next stage
    checkpoints.export(workdir, state["params"], meta={"stage": config.stage, "model": config.model.to_dict(),
                                                         "step": int(state["step"]), "data_stats": data.stats()},
                       save_tokenizer=data.save_tokenizer)
    return last
