"""DPO family (sigmoid DPO, IPO, listwise Plackett–Luce) offline from the RM's K-wise comparisons.

Reads top to bottom: mesh -> data -> init -> step -> loop -> save. The same data, train step and
loop as the reward model; the objective is `losses.dpo_loss` on the summed completion log-probs
of the policy and of the frozen SFT reference, which is passed to the step as `frozen`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from instructgpt_jax import harness, lora, losses, scoring, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import Transformer


def check_config(config) -> None:
    """Options that cannot work together, refused before anything runs (one line each)."""
    cfg = config.dpo
    if cfg.loss_type not in losses.DPO_LOSS_TYPES:
        raise UserError(f"config.dpo.loss_type={cfg.loss_type!r}; valid: {', '.join(losses.DPO_LOSS_TYPES)}")
    if cfg.ipo_token_mean and cfg.loss_type != "ipo":
        raise UserError(f"config.dpo.ipo_token_mean=True applies to loss_type='ipo' only (got {cfg.loss_type!r})")
    if not cfg.pl_normalize and cfg.loss_type != "plackett_luce":
        raise UserError(f"config.dpo.pl_normalize=False applies to loss_type='plackett_luce' only "
                        f"(got {cfg.loss_type!r})")


def loss_fn(params, batch, rng, reference, *, model, beta, loss_type, ipo_token_mean=False, pl_normalize=True):
    """dpo_loss on Δ = log π(y|x) − log π_ref(y|x) (ipo_token_mean: divided by each completion's token
    count); metrics: pair accuracy, implicit rewards βΔ of the preferred / dispreferred completions and
    their margin, and KL(π‖π_ref) summed over each completion's tokens (exact over the vocabulary, at the
    data's prefixes)."""
    st, mask = scoring.completion_token_logprobs(params, model, batch, rng=rng, reference=reference)
    b, k = batch["ranks"].shape
    per_seq = lambda x: jnp.where(mask, x, 0.0).sum(-1).reshape(b, k)  # noqa: E731
    logp, ref_logp = per_seq(st["logp"]), per_seq(jax.lax.stop_gradient(st["ref_logp"]))
    lengths = jnp.sum(mask, axis=-1).reshape(b, k)  # response tokens per completion: what logp sums over
    loss, aux = losses.dpo_loss(logp, ref_logp, batch["ranks"], batch["valid"], beta, loss_type, lengths=lengths,
                                ipo_token_mean=ipo_token_mean, pl_normalize=pl_normalize)
    kl = per_seq(jax.lax.stop_gradient(st["kl"]))
    return loss, {"weight": aux["num_prompts"], "accuracy": aux["accuracy"], "accuracy_weight": aux["num_pairs"],
                  "chosen_reward": aux["chosen_reward"], "rejected_reward": aux["rejected_reward"],
                  "margin": aux["margin"], "kl": losses.masked_mean(kl, batch["valid"])}


def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Train the policy with the DPO family from the SFT export; exports it like SFT. Resumes."""
    check_config(config)
    if not config.init.from_workdir:
        raise UserError("config.init.from_workdir must name the SFT stage's workdir (policy and frozen reference)")
    # --- mesh (and the config resolved: the SFT export's model, data paths checked)
    run = harness.Stage(config, workdir)
    config, mesh = run.config, run.mesh

    # --- data: the reward model's comparisons (no demonstrations: DPO has no bias to fit)
    data = prepare.prepare_comparisons(config, workdir, builtin_data, demonstrations=False)

    # --- init: policy = reference = SFT; resume overwrites the policy
    # (LoRA: the reference is the frozen base itself, with the adapters off: no second model)
    model = Transformer(lora.model_config(config))
    manager = run.start(data, model)
    reference = run.source.params(lora.plain(model), mesh)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    params, base = lora.setup(config, model, reference, rng, mesh, adapter_params=run.adapter(model))
    if base is None:
        params = jax.tree.map(jnp.copy, reference)  # the policy: a copy, since the train state is donated
    else:
        reference = base

    # --- step + loop: the generic train step on this stage's loss, the shared loop
    state, last = train_lib.run_supervised(
        config=config, workdir=workdir, mesh=mesh, manager=manager, params=params, tx=tx, data=data, rng=rng,
        loss_fn=lora.with_base(functools.partial(
            loss_fn, model=model, beta=config.dpo.beta, loss_type=config.dpo.loss_type,
            ipo_token_mean=config.dpo.ipo_token_mean, pl_normalize=config.dpo.pl_normalize)),
        units_per_step=config.train.batch_size * config.data.max_k * config.data.seq_len,
        frozen=(base, reference), tasks_fn=run.tasks(model, data, lambda s: lora.combine(s["params"], base)))

    # --- save: the policy, loadable wherever an SFT export is
    run.export(state["params"], data, step=int(state["step"]), beta=config.dpo.beta, loss_type=config.dpo.loss_type,
               ipo_token_mean=config.dpo.ipo_token_mean, pl_normalize=config.dpo.pl_normalize, base=base)
    return last
