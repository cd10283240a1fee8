"""Supervised fine-tuning (and pretraining: the same loss over every token).

Reads top to bottom: mesh -> data -> init -> step -> loop -> save.
`train(config, workdir)` is what `main.py` calls for `config.stage in ('sft', 'pretrain')`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from instructgpt_jax import checkpoints, losses, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.models import ModelConfig, Transformer


def lm_loss_fn(params, batch, rng, *, model, deterministic):
    """Token cross-entropy on loss_mask (response tokens for SFT, every token for pretraining)."""
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                         deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
    loss, aux = losses.sft_loss(logits, batch["targets"], batch["loss_mask"])
    return loss, {"accuracy": aux["accuracy"], "weight": aux["num_tokens"]}


def train_step(state, batch, rng, *, model, tx, grad_accum=1):
    """One optimizer step: (state, batch, rng) -> (state, metrics). Pure; jitted by the caller."""
    rng = jax.random.fold_in(rng, state["step"])
    loss_fn = functools.partial(lm_loss_fn, model=model, deterministic=False)
    loss, aux, grads = train_lib.accumulate_gradients(loss_fn, state["params"], batch, rng, grad_accum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    metrics = {"loss": loss, "accuracy": aux["accuracy"], "grad_norm": train_lib.global_norm(grads),
               "tokens": aux["weight"]}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, *, model):
    """Summed token loss and token count (summed over batches by the caller for an exact mean)."""
    loss, aux = lm_loss_fn(params, batch, None, model=model, deterministic=True)
    return {"loss_sum": loss * aux["weight"], "tokens": aux["weight"], "acc_sum": aux["accuracy"] * aux["weight"]}


def from_hf_checkpoint(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.init.hf_path set: config.model follows the checkpoint's config.json, and its SentencePiece
    tokenizer.model (LLaMA-family checkpoints ship one) becomes the tokenizer unless one is given."""
    from instructgpt_jax import hf
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.update(hf.model_config_dict(config.init.hf_path))
    if not config.data.tokenizer:
        tok = hf.load_tokenizer(config.init.hf_path)
        if tok is None:
            raise ValueError(f"{config.init.hf_path} has no SentencePiece tokenizer.model (GPT-2 checkpoints ship "
                             f"a BPE tokenizer.json, which this project does not read); set config.data.tokenizer "
                             f"to a SentencePiece model whose ids match the checkpoint's vocabulary")
        config.data.tokenizer = tok
    return config


def init_state(model, tx, config, mesh, rng, init_from=None):
    """Sharded train state. Params: from `init_from` (an export path) if given, else from
    config.init.hf_path (a Hugging Face directory) if given, else scratch."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    init_fn = lambda r: model.init(r, dummy)["params"]  # noqa: E731
    if init_from == "hf":
        from instructgpt_jax import hf
        _, params = hf.load_pretrained(config.init.hf_path, mesh=mesh)
    elif init_from:
        shapes, shardings = sharding.param_shardings(init_fn, mesh)
        params = checkpoints.load_export(init_from, checkpoints.abstract_like(shapes, shardings))
    else:
        params, shardings = sharding.init_sharded(init_fn, rng, mesh)
    opt_state = sharding.init_optimizer(tx, params)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}


def evaluate(eval_fn, params, batches, mesh, max_batches: int = 0) -> dict:
    totals = train_lib.sum_over_batches(eval_fn, params, batches, mesh, max_batches)
    if not totals:
        return {}
    n = max(totals["tokens"], 1.0)
    return {"eval_loss": totals["loss_sum"] / n, "eval_accuracy": totals["acc_sum"] / n}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the stage; returns the final metrics. Resumes from `workdir` if it holds checkpoints."""
    if config.init.hf_path:
        config = from_hf_checkpoint(config)
    # --- mesh
    mesh = sharding.make_mesh(config.mesh)
    local_batch = sharding.batch_size_per_process(config.train.batch_size, mesh)
    del local_batch  # the pipeline derives the same split; this call validates it early

    manager = checkpoints.Manager(workdir, config)  # refuses an incompatible workdir before any work

    # --- data
    kind = "text" if config.stage == "pretrain" else "demonstrations"
    data = prepare.prepare(config, workdir, kind)
    train_iter = data.train_iterator()
    model_cfg = ModelConfig.from_config(config.model)
    if data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {data.tokenizer.vocab_size} tokens but config.model.vocab_size="
                         f"{model_cfg.vocab_size}; raise config.model.vocab_size")

    # --- init: resume from this workdir -> previous stage's export -> scratch
    model = Transformer(model_cfg)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    init_from = "hf" if config.init.hf_path else prepare.init_source(config)
    rng = jax.random.PRNGKey(config.seed)
    state = init_state(model, tx, config, mesh, rng, init_from if manager.latest_step() is None else None)
    state, state_shardings = train_lib.place_and_resume(state, mesh, manager, train_iter)

    # --- step
    step_fn = train_lib.jit_train_step(
        functools.partial(train_step, model=model, tx=tx, grad_accum=config.train.grad_accum), state_shardings, mesh)
    repl = sharding.replicated(mesh)
    eval_fn = jax.jit(functools.partial(eval_step, model=model), out_shardings=repl)

    # --- loop
    state, last = train_lib.fit(
        config=config, workdir=workdir, mesh=mesh, manager=manager, state=state, step_fn=step_fn,
        train_iter=train_iter, rng=rng, tokens_per_step=config.train.batch_size * config.data.seq_len,
        evaluate_fn=lambda params: evaluate(eval_fn, params, data.eval_iterator(), mesh, config.train.eval_batches))

    # --- save: params-only export for the next stage
    checkpoints.export(workdir, state["params"], meta={"stage": config.stage, "model": config.model.to_dict(),
                                                         "step": int(state["step"]), "data_stats": data.stats()},
                       tokenizer_path=data.tokenizer_path)
    return last
