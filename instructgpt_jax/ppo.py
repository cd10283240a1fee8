"""PPO / PPO-ptx: the SFT policy against a frozen reward model, with a per-token KL penalty
towards the frozen SFT model and (ptx_coef > 0) a pretraining log-likelihood term.

Reads top to bottom: mesh -> data -> init (four models) -> rollout -> update -> loop -> save.
One iteration: sample a batch of responses (jitted KV-cache sampler), score them with the RM,
recompute old log-probs / reference log-probs / values with the training forward pass, shape the
rewards (`rl.kl_penalized_rewards`), GAE + whitening, then `ppo_epochs` passes of shuffled
minibatches updating policy and value with separate optimizers, and the policy EMA.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, losses, rl, sampling, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.models import ModelConfig, Transformer
from instructgpt_jax.rm import rewards_at


# ----------------------------------------------------------------------------- pure pieces

def sequence_inputs(tokens, prompt_mask, response_mask):
    """Full rows as every model sees them: segment 1 on real prompt + response tokens, 0 on pads."""
    segments = jnp.concatenate([prompt_mask.astype(jnp.int32), response_mask.astype(jnp.int32)], axis=1)
    return tokens, sampling.left_pad_positions(segments), segments


def response_logprobs(params, model, tokens, positions, segments, p):
    """log pi(y_t | x, y_<t) of the response tokens [B, N] and the logits [B, N, V] they come from."""
    logits = model.apply({"params": params}, tokens, positions, segments)[:, p - 1:-1]
    return losses.token_logprobs(logits, tokens[:, p:]), logits


def response_values(params, model, tokens, positions, segments, p):
    """V(state before each response token) [B, N]: the scalar head at the token just before it."""
    return model.apply({"params": params}, tokens, positions, segments)[:, p - 1:-1]


def rollout_stats(policy_params, ref_params, value_params, rm_params, sample, kl_beta, *, policy, value_model,
                  rm_model, rm_bias, cfg):
    """Everything the update needs from one sampled batch. Pure; jitted by the caller."""
    p = sample["prompt_mask"].shape[1]
    mask = sample["response_mask"]
    tokens, positions, segments = sequence_inputs(sample["tokens"], sample["prompt_mask"], mask)
    old_logp, logits = response_logprobs(policy_params, policy, tokens, positions, segments, p)
    ref_logp, _ = response_logprobs(ref_params, policy, tokens, positions, segments, p)
    values = response_values(value_params, value_model, tokens, positions, segments, p) * mask
    # RM score at the last response token (its EOS when one was sampled), with the fitted bias.
    last = p + jnp.maximum(sample["lengths"] - 1, 0)
    score = rewards_at(rm_model.apply({"params": rm_params}, tokens, positions, segments), last) + rm_bias
    if cfg.penalize_no_eos:
        score = jnp.where(sample["ended"], score, cfg.no_eos_score)
    rewards = rl.kl_penalized_rewards(score, old_logp, ref_logp, mask, kl_beta, kl_estimator=cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
    advantages = rl.whiten(advantages, mask)
    kl_seq = (rl.per_token_kl(old_logp, ref_logp, cfg.kl_estimator) * mask).sum(-1)
    entropy = losses.masked_mean(losses.entropy(logits), mask)
    batch = dict(tokens=tokens, positions=positions, segments=segments, mask=mask, old_logp=old_logp,
                 old_values=values, advantages=advantages, returns=returns)
    metrics = dict(score=score.mean(), kl=kl_seq.mean(), entropy=entropy, response_length=mask.sum(-1).mean(),
                   eos_rate=sample["ended"].mean(), reward_total=(rewards * mask).sum(-1).mean())
    return batch, metrics


def update_step(state, rollout, idx, ptx, rng, *, policy, value_model, policy_tx, value_tx, cfg, prompt_len):
    """One PPO minibatch: policy (+ ptx) and value gradient steps with their own optimizers, then EMA.
    (state, rollout, minibatch indices, pretraining batch, rng) -> (state, metrics). Pure."""
    del rng  # no dropout in PPO (the first ratio must be exactly 1)
    mb = jax.tree.map(lambda x: x[idx], rollout)
    p = prompt_len

    def policy_loss(params):
        logp, logits = response_logprobs(params, policy, mb["tokens"], mb["positions"], mb["segments"], p)
        loss, aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], cfg.clip_eps)
        aux = dict(aux, pg_loss=loss)
        if cfg.ptx_coef > 0:  # PPO-ptx: gamma * pretraining NLL on every minibatch
            ptx_logits = policy.apply({"params": params}, ptx["tokens"], ptx["positions"], ptx["segment_ids"])
            ptx_l, _ = losses.ptx_loss(ptx_logits, ptx["targets"], ptx["loss_mask"])
            loss = loss + cfg.ptx_coef * ptx_l
            aux["ptx_loss"] = ptx_l
        return loss, aux

    def value_loss(params):
        v = response_values(params, value_model, mb["tokens"], mb["positions"], mb["segments"], p)
        loss, aux = losses.value_loss(v, mb["old_values"], mb["returns"], mb["mask"], cfg.value_clip_eps)
        return cfg.value_coef * loss, dict(aux, value_loss=loss)

    (_, p_aux), p_grads = jax.value_and_grad(policy_loss, has_aux=True)(state["policy"]["params"])
    (_, v_aux), v_grads = jax.value_and_grad(value_loss, has_aux=True)(state["value"]["params"])

    def apply(part, grads, tx):
        updates, opt_state = tx.update(grads, part["opt_state"], part["params"])
        return {"params": jax.tree.map(jnp.add, part["params"], updates), "opt_state": opt_state}

    new_policy = apply(state["policy"], p_grads, policy_tx)
    ema = jax.tree.map(lambda e, x: cfg.ema_decay * e + (1 - cfg.ema_decay) * x, state["ema"], new_policy["params"])
    new_state = dict(state, policy=new_policy, value=apply(state["value"], v_grads, value_tx), ema=ema)
    metrics = dict(p_aux, **v_aux, policy_grad_norm=train_lib.global_norm(p_grads),
                   value_grad_norm=train_lib.global_norm(v_grads))
    return new_state, metrics


# ----------------------------------------------------------------------------- models

def load_models(config, mesh):
    """Policy + reference (from the SFT export) and reward + value (from the RM export), all sharded
    by the same rules. The RM / value model may be a different size from the policy."""
    sft = prepare.init_source(config)
    if not sft:
        raise ValueError("config.init.from_workdir must name the SFT stage's workdir (policy and reference)")
    if not config.ppo.rm_workdir:
        raise ValueError("config.ppo.rm_workdir must name the reward-model stage's workdir")
    checkpoints.check_model_matches(checkpoints.read_export_meta(sft)["model"], config.model, sft)
    rm_meta = checkpoints.read_export_meta(config.ppo.rm_workdir)
    if "rm_bias" not in rm_meta:
        raise ValueError(f"{config.ppo.rm_workdir} is not a reward-model export (no rm_bias in its meta.json)")
    policy = Transformer(ModelConfig.from_config(config.model))
    rm_model = Transformer(ModelConfig.from_config(rm_meta["model"]), head="scalar")
    dummy = jnp.zeros((1, 8), jnp.int32)

    def load(model, path):
        shapes, shards = sharding.param_shardings(lambda r: model.init(r, dummy)["params"], mesh)
        return checkpoints.load_export(path, checkpoints.abstract_like(shapes, shards))

    return dict(policy=policy, rm_model=rm_model, sft_params=load(policy, sft),
                rm_params=load(rm_model, config.ppo.rm_workdir), rm_bias=float(rm_meta["rm_bias"]))


def init_state(m, policy_tx, value_tx, config):
    # Copies (not aliases): the frozen reference / RM must survive the donated updates.
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    policy, value = copy(m["sft_params"]), copy(m["rm_params"])
    return {"step": jnp.zeros((), jnp.int32),
            "policy": {"params": policy, "opt_state": sharding.init_optimizer(policy_tx, policy)},
            "value": {"params": value, "opt_state": sharding.init_optimizer(value_tx, value)},
            "ema": copy(policy), "kl_beta": rl.kl_controller_init(config.ppo.kl_coef)}


# ----------------------------------------------------------------------------- stage

def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run PPO (ptx_coef > 0: PPO-ptx); exports the policy (and its EMA). Resumes from `workdir`."""
    cfg = config.ppo
    # --- mesh
    mesh = sharding.make_mesh(config.mesh)
    sharding.batch_size_per_process(config.train.batch_size, mesh)
    if config.train.batch_size % cfg.minibatch_size:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} is not a multiple of "
                         f"config.ppo.minibatch_size={cfg.minibatch_size}")

    manager = checkpoints.Manager(workdir, config)  # refuses an incompatible workdir before any work

    # --- data
    data = prepare.prepare_ppo(config, workdir)
    p, n = config.data.max_prompt_len, cfg.max_new_tokens

    # --- init: four models on one mesh
    m = load_models(config, mesh)
    policy, rm_model = m["policy"], m["rm_model"]
    policy_tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    value_tx = train_lib.make_optimizer(config.value_optim, config.train.num_steps)
    state, state_shardings = sharding.place(init_state(m, policy_tx, value_tx, config), mesh)
    if manager.latest_step() is not None:
        state, data_state = manager.restore(checkpoints.abstract_like(state, state_shardings))
        data.prompts.set_state(data_state["prompts"])
        if data.ptx is not None:
            data.ptx.set_state(data_state["ptx"])
    data_state = lambda: {"prompts": data.prompts.get_state(),  # noqa: E731
                          "ptx": data.ptx.get_state() if data.ptx is not None else None}

    # --- rollout: one jitted sampler + one jitted scoring program
    sampler = sampling.make_sampler(policy, max_new_tokens=n, eos_id=data.tokenizer.eos_id,
                                    pad_id=data.tokenizer.pad_id, temperature=cfg.temperature, top_k=cfg.top_k,
                                    top_p=cfg.top_p)
    stats_fn = jax.jit(functools.partial(rollout_stats, policy=policy, value_model=rm_model, rm_model=rm_model,
                                         rm_bias=m["rm_bias"], cfg=cfg))

    def rollout(state, prompts, rng):
        g = sharding.host_to_global(prompts, mesh)
        sample = sampler(state["policy"]["params"], g["prompt_tokens"], g["prompt_mask"], rng)
        sample["prompt_mask"] = g["prompt_mask"]
        return stats_fn(state["policy"]["params"], m["sft_params"], state["value"]["params"], m["rm_params"],
                        sample, state["kl_beta"])

    # --- update
    repl = sharding.replicated(mesh)
    update_fn = jax.jit(functools.partial(update_step, policy=policy, value_model=rm_model, policy_tx=policy_tx,
                                          value_tx=value_tx, cfg=cfg, prompt_len=p),
                        in_shardings=(state_shardings, None, None, None, repl),
                        out_shardings=(state_shardings, repl), donate_argnums=0)
    kl_update = jax.jit(functools.partial(rl.kl_update, target=cfg.kl_target or None, horizon=cfg.kl_horizon),
                        out_shardings=repl)
    increment = jax.jit(lambda x: x + 1, out_shardings=repl)
    no_ptx = {"tokens": jnp.zeros((1, 1), jnp.int32)}  # placeholder when ptx_coef == 0

    def iteration(state, step):
        """Rollout a batch, then `ppo_epochs` shuffled passes of minibatch updates; returns metrics."""
        it_rng = jax.random.fold_in(rng, step)
        t0 = time.perf_counter()
        batch, r_metrics = rollout(state, next(data.prompts), jax.random.fold_in(it_rng, 0))
        r_metrics = jax.device_get(r_metrics)
        t1 = time.perf_counter()
        u_metrics = []
        for epoch in range(cfg.ppo_epochs):
            perm = jax.random.permutation(jax.random.fold_in(it_rng, 1 + epoch), config.train.batch_size)
            for j in range(n_mb):
                ptx = sharding.host_to_global(next(data.ptx), mesh) if data.ptx is not None else no_ptx
                idx = perm[j * cfg.minibatch_size:(j + 1) * cfg.minibatch_size]
                state, mb_metrics = update_fn(state, batch, idx, ptx, jax.random.fold_in(it_rng, 100 + j))
                u_metrics.append(mb_metrics)
        u_metrics = {k: float(np.mean([x[k] for x in jax.device_get(u_metrics)])) for k in u_metrics[0]}
        t2 = time.perf_counter()
        state["kl_beta"] = kl_update(state["kl_beta"], r_metrics["kl"], config.train.batch_size)
        state["step"] = increment(state["step"])
        tokens = config.train.batch_size * (p + n)
        metrics = {**{k: float(v) for k, v in r_metrics.items()}, **u_metrics, "beta": float(state["kl_beta"]),
                   "explained_variance": float(rl.explained_variance(batch["old_values"], batch["returns"],
                                                                     batch["mask"])),
                   "rollout_tokens_per_sec": tokens / (t1 - t0),
                   "update_tokens_per_sec": tokens * cfg.ppo_epochs / (t2 - t1)}
        return state, metrics

    # --- loop
    rng = jax.random.PRNGKey(config.seed)
    start, total = int(state["step"]), config.train.num_steps
    writer = train_lib.MetricWriter(workdir, resume_step=start)
    progress = train_lib.Progress(total, start, "ppo", config.train.progress)
    n_mb = config.train.batch_size // cfg.minibatch_size
    last = {}
    try:
        with sharding.use(mesh):
            for step in range(start + 1, total + 1):
                state, last = iteration(state, step)
                train_lib.check_finite(step, last, keys=("pg_loss", "value_loss", "score"))
                is_last = step == total
                if is_last or (config.train.eval_every and step % config.train.eval_every == 0):
                    last.update(evaluate(rollout, state, data, config))
                if step % config.train.log_every == 0 or is_last:
                    writer.write(step, last)
                progress.update(1, score=last["score"], kl=last["kl"])
                if step % config.train.checkpoint_every == 0 or is_last:
                    manager.save(step, state, data_state(), force=is_last)
    finally:  # finish in-flight async saves, also on Ctrl-C / errors
        progress.close()
        manager.close()
        writer.close()

    # --- save: the policy (and its EMA, for evaluation) for the next stage / evaluation
    meta = {"stage": "ppo", "model": config.model.to_dict(), "step": int(state["step"]),
            "ptx_coef": cfg.ptx_coef, "kl_beta": float(state["kl_beta"])}
    checkpoints.export(workdir, state["policy"]["params"], meta=meta, tokenizer_path=data.tokenizer_path)
    checkpoints.export(workdir, state["ema"], meta=dict(meta, ema_decay=cfg.ema_decay),
                       tokenizer_path=data.tokenizer_path, name="export_ema")
    return last


def evaluate(rollout, state, data, config) -> dict:
    """RM score and KL to SFT of the current policy's samples on held-out prompts."""
    scores, kls = [], []
    for i, prompts in enumerate(data.eval_prompts()):
        if config.train.eval_batches and i >= config.train.eval_batches:
            break
        if not np.asarray(prompts["prompt_mask"]).any(-1).all():
            break  # the final, padded batch: its empty rows have nothing to continue
        _, met = jax.device_get(rollout(state, prompts, jax.random.PRNGKey(10_000 + i)))
        scores.append(float(met["score"]))
        kls.append(float(met["kl"]))
    return {"eval_score": float(np.mean(scores)), "eval_kl": float(np.mean(kls))} if scores else {}

