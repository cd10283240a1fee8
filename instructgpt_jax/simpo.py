"""SimPO (reference-free, length-normalised preference optimisation) offline from the RM's K-wise comparisons.

Reads top to bottom: mesh -> data -> init -> step -> loop -> save. The DPO stage's data, train step and loop;
the objective is `losses.simpo_loss` on the policy's summed completion log-probs and completion lengths.
No reference model: only the policy is loaded (from the SFT export) and trained.
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


def loss_fn(params, batch, rng, frozen, *, model, beta, gamma):
    """simpo_loss on r = β · (average completion log-prob); metrics: pair accuracy, the rewards of the
    preferred / dispreferred completions and their margin."""
    del frozen  # reference-free
    st, mask = scoring.completion_token_logprobs(params, model, batch, rng=rng)
    b, k = batch["ranks"].shape
    logp = jnp.where(mask, st["logp"], 0.0).sum(-1).reshape(b, k)
    loss, aux = losses.simpo_loss(logp, mask.sum(-1).reshape(b, k), batch["ranks"], batch["valid"], beta, gamma)
    return loss, {"weight": aux["num_prompts"], "accuracy": aux["accuracy"], "accuracy_weight": aux["num_pairs"],
                  "chosen_reward": aux["chosen_reward"], "rejected_reward": aux["rejected_reward"],
                  "margin": aux["margin"]}


def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Train the policy with SimPO from the SFT export; exports it like SFT. Resumes."""
    if not config.init.from_workdir:
        raise UserError("config.init.from_workdir must name the SFT stage's workdir (the policy starts from it)")
    # --- mesh (and the config resolved: the SFT export's model, data paths checked)
    run = harness.Stage(config, workdir)
    config, mesh = run.config, run.mesh

    # --- data: the reward model's comparisons (no demonstrations: SimPO has no bias to fit)
    data = prepare.prepare_comparisons(config, workdir, builtin_data, demonstrations=False)

    # --- init: policy = SFT (no reference copy); resume overwrites it
    model = Transformer(lora.model_config(config))
    manager = run.start(data, model)
    params = run.source.params(lora.plain(model), mesh)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    params, base = lora.setup(config, model, params, rng, mesh, adapter_params=run.adapter(model))

    # --- step + loop: the generic train step on this stage's loss, the shared loop
    state, last = train_lib.run_supervised(
        config=config, workdir=workdir, mesh=mesh, manager=manager, params=params, tx=tx, data=data, rng=rng,
        loss_fn=lora.with_base(functools.partial(loss_fn, model=model, beta=config.simpo.beta,
                                                 gamma=config.simpo.gamma)), frozen=(base, None),
        units_per_step=config.train.batch_size * config.data.max_k * config.data.seq_len,
        tasks_fn=run.tasks(model, data, lambda s: lora.combine(s["params"], base)))

    # --- save: the policy, loadable wherever an SFT export is
    run.export(state["params"], data, step=int(state["step"]), beta=config.simpo.beta, gamma=config.simpo.gamma,
               base=base)
    return last
