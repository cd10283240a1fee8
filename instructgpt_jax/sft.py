"""Supervised fine-tuning (and pretraining: the same loss over every token).

Reads top to bottom: mesh -> data -> init -> step -> loop -> save.
`train(config, workdir)` is what `main.py` calls for `config.stage in ('sft', 'pretrain')`.
"""
from __future__ import annotations

import functools

import jax
import ml_collections

from instructgpt_jax import harness, lora, losses, scoring, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.models import Transformer


def loss_fn(params, batch, rng, frozen=None, *, model):
    """Token cross-entropy on loss_mask (response tokens for SFT, every token for pretraining)."""
    del frozen
    hidden = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         deterministic=rng is None, rngs=None if rng is None else {"dropout": rng}, return_hidden=True)
    st = scoring.token_stats(params, model, hidden, batch["targets"], correct=True)  # chunked LM head
    loss, aux = losses.token_nll(st["logp"], st["correct"], batch["loss_mask"])
    return loss, {"accuracy": aux["accuracy"], "weight": aux["num_tokens"]}


def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Run the stage; returns the final metrics. Resumes from `workdir` if it holds checkpoints.
    `builtin_data(kind, n, seed, split) -> rows` is read for data paths set to 'builtin' (see data.prepare)."""
    # --- mesh (and the config resolved: the checkpoint's model, data paths checked)
    run = harness.Stage(config, workdir)
    config, mesh = run.config, run.mesh

    # --- data
    data = prepare.prepare(config, workdir, "text" if config.stage == "pretrain" else "demonstrations", builtin_data)

    # --- init: resume from this workdir -> previous stage's export -> Hugging Face checkpoint -> scratch
    # (LoRA: adapters on the frozen base, which is loaded even when resuming: only the adapters are checkpointed)
    model = Transformer(lora.model_config(config))
    manager = run.start(data, model)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    if run.resuming and not lora.enabled(config):
        params = sharding.init_model(model, rng, mesh)  # only a template: the restore overwrites it
    elif run.source:
        params = run.source.params(lora.plain(model), mesh)
    elif config.init.hf_path:
        from instructgpt_jax import hf
        _, params = hf.load_pretrained(config.init.hf_path, mesh=mesh)
    else:
        params = sharding.init_model(lora.plain(model), rng, mesh)
    params, base = lora.setup(config, model, params, rng, mesh, adapter_params=run.adapter(model))

    # --- step + loop: the generic train step on this stage's loss, the shared loop
    state, last = train_lib.run_supervised(
        config=config, workdir=workdir, mesh=mesh, manager=manager, params=params, tx=tx, data=data, rng=rng,
        loss_fn=lora.with_base(functools.partial(loss_fn, model=model)), frozen=(base, None),
        units_per_step=config.train.batch_size * config.data.seq_len,
        tasks_fn=run.tasks(model, data, lambda s: lora.combine(s["params"], base)))

    # --- save: params-only export for the next stage (LoRA: merged, and the adapters apart)
    run.export(state["params"], data, step=int(state["step"]), base=base)
    return last
