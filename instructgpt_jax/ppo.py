"""The RL stage: PPO / PPO-ptx with a value model, and the critic-free group methods (GRPO, Dr. GRPO,
RLOO), against a frozen reward model or a programmatic verifier, with a KL penalty towards the
frozen SFT model (per-token k1 in the reward, or a k3 / k2 loss term) and (ptx_coef > 0) the
pretraining log-likelihood.

Reads top to bottom: mesh -> data -> init -> rollout -> update -> loop -> save.
One iteration: sample `group_size` responses per prompt (the jitted KV-cache sampler, in chunks of
`rollout_chunk` rows), score them (RM on the response with an EOS appended when none was sampled,
exactly as the RM was trained; or the verifier), recompute old / reference log-probs and values
with the training forward pass (chunks of the minibatch's shape), compute advantages (GAE on the
KL-shaped per-token rewards, or group-relative), then `ppo_epochs` passes of shuffled minibatch
updates of the policy (and value model), and the bias-corrected EMA of the policy.
"""
from __future__ import annotations

import functools
import importlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, harness, lora, losses, plan, rl, sampling, scoring, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import Transformer

ADVANTAGE_ESTIMATORS = ("gae",) + rl.GROUP_ADVANTAGE_KINDS
REWARDS = ("rm", "verifier")
KL_PENALTIES = ("reward", "loss")
# config.ppo.loss_agg '' = each estimator's paper (losses.aggregate): PPO's token mean; GRPO's mean over
# responses of token means (Shao et al. 2024 eq. 3); Dr. GRPO's token sum over a constant (Liu et al. 2025);
# RLOO's sequence-level REINFORCE, a mean over responses of token sums (Ahmadian et al. 2024).
PAPER_LOSS_AGG = {"gae": "token_mean", "grpo": "seq_mean_token_mean", "dr_grpo": "seq_mean_token_sum_norm",
                  "rloo": "seq_mean_token_sum"}


def check_config(config) -> None:
    """Options that cannot work together, refused before anything runs (one line each)."""
    cfg, b = config.ppo, config.train.batch_size
    for key, value, valid in (("advantage_estimator", cfg.advantage_estimator, ADVANTAGE_ESTIMATORS),
                              ("reward", cfg.reward, REWARDS), ("kl_penalty", cfg.kl_penalty, KL_PENALTIES)):
        if value not in valid:
            raise UserError(f"config.ppo.{key}={value!r}; valid: {', '.join(valid)}")
    if cfg.kl_penalty == "reward" and cfg.kl_estimator != "k1":
        raise UserError(f"config.ppo.kl_estimator={cfg.kl_estimator!r} with kl_penalty='reward': rewards are constants "
                        f"to PPO, so only k1 gives the KL's gradient there; use kl_penalty='loss' for k2 / k3")
    if cfg.kl_penalty == "loss" and cfg.kl_estimator not in ("k2", "k3"):
        raise UserError(f"config.ppo.kl_estimator={cfg.kl_estimator!r} with kl_penalty='loss': valid k2, k3 (k1 as a "
                        f"loss term has zero expected gradient)")
    if cfg.loss_agg not in ("",) + losses.AGGREGATIONS:
        raise UserError(f"config.ppo.loss_agg={cfg.loss_agg!r}; valid: '' (the advantage estimator's paper), "
                        f"{', '.join(losses.AGGREGATIONS)}")
    if config.train.grad_accum > 1:  # the update is one jitted minibatch step; minibatch_size is the memory knob
        raise UserError(f"config.train.grad_accum={config.train.grad_accum}: the RL stage does not accumulate "
                        f"gradients; lower config.ppo.minibatch_size (and rollout_chunk) to use less memory")
    micro = cfg.ptx_microbatch
    if cfg.ptx_coef > 0 and (micro < 0 or micro and cfg.ptx_batch_size % micro):
        raise UserError(f"config.ppo.ptx_microbatch={cfg.ptx_microbatch} must divide config.ppo.ptx_batch_size="
                        f"{cfg.ptx_batch_size} (0 = automatic)")
    critic_free = cfg.advantage_estimator != "gae"
    if critic_free and cfg.group_size < 2:
        raise UserError(f"config.ppo.group_size={cfg.group_size}: advantage_estimator={cfg.advantage_estimator!r} "
                        f"compares samples of one prompt, so it needs group_size >= 2")
    chunk = cfg.rollout_chunk or cfg.minibatch_size
    for what, n, d in (("config.train.batch_size", b, cfg.minibatch_size), ("config.train.batch_size", b, chunk),
                       ("config.train.batch_size", b, cfg.group_size), ("config.ppo.rollout_chunk", chunk, cfg.group_size)):
        if n % d:
            raise UserError(f"{what}={n} is not a multiple of {d} (config.ppo.minibatch_size / rollout_chunk / "
                            f"group_size must divide it)")
    if cfg.reward == "verifier" and not cfg.verifier:
        raise UserError("config.ppo.reward='verifier' needs config.ppo.verifier='module:function' (prompt, response) "
                        "-> float, e.g. 'instructgpt_jax.miniature.world:verify'")
    if cfg.reward == "rm" and not cfg.rm_workdir:
        raise UserError("config.ppo.rm_workdir must name the reward-model stage's workdir (or set "
                        "config.ppo.reward='verifier')")


def load_verifier(spec: str):
    """'package.module:function' -> the function (prompt text, response text) -> float."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"config.ppo.verifier={spec!r} is not an importable 'module:function' ({e})") from None


# ----------------------------------------------------------------------------- pure pieces

def loss_aggregation(cfg) -> tuple[str, int | None]:
    """config.ppo -> (agg, max_tokens) for losses.ppo_policy_loss and losses.kl_loss: config.ppo.loss_agg, or
    when it is '' the advantage estimator's paper (PAPER_LOSS_AGG); max_tokens = max_new_tokens for Dr. GRPO's
    constant normaliser, else None."""
    agg = cfg.loss_agg or PAPER_LOSS_AGG[cfg.advantage_estimator]
    return agg, (cfg.max_new_tokens if agg == "seq_mean_token_sum_norm" else None)


def rollout_forward(params, sample, *, policy, value_model, rm_model, eos_id, temperature, rm_bias):
    """Old and reference log-probs, values and RM scores of one chunk of samples. Pure; jitted on chunks
    of the minibatch's shape, so the first update's ratio comes from the same program shape.
    params: {'policy', 'reference', 'value' (or None), 'rm' (or None)}."""
    p = sample["prompt_mask"].shape[1]
    mask = sample["response_mask"]
    rows = scoring.sequence_inputs(sample["tokens"], sample["prompt_mask"], mask)
    out = {"old_logp": scoring.response_logprobs(params["policy"], policy, *rows, p, temperature)[0],
           "ref_logp": scoring.response_logprobs(params["reference"], policy, *rows, p, temperature)[0]}
    if params.get("value") is not None:
        out["values"] = scoring.response_values(params["value"], value_model, *rows, p) * mask
    if params.get("rm") is not None:  # scored as in RM training: an EOS closes every completion
        t, pos, seg, last = scoring.append_eos(sample["tokens"], sample["prompt_mask"], mask, sample["ended"], eos_id)
        out["scores"] = scoring.score(params["rm"], t, seg, pos, last, model=rm_model, bias=rm_bias)
    return out


def advantages(scores, old_logp, ref_logp, values, mask, ended, kl_beta, *, cfg):
    """Advantages, returns and metrics of one rollout batch [B, N]. Pure; jitted by the caller.

    gae: per-token rewards −β·k1 (kl_penalty 'reward') with the score at the last token, GAE, whitening.
    grpo / dr_grpo / rloo: one sequence reward (score, minus β·Σk1 when the KL is in the reward),
    group-relative over each prompt's `group_size` consecutive samples, given to every response token."""
    if cfg.penalize_no_eos:  # subtracted: a truncated response scores `no_eos_penalty` below its RM score
        scores = jnp.where(ended, scores, scores - cfg.no_eos_penalty)
    beta = kl_beta if cfg.kl_penalty == "reward" else 0.0
    kl_seq = (rl.per_token_kl(old_logp, ref_logp, "k1") * mask).sum(-1)
    if cfg.advantage_estimator == "gae":
        rewards = rl.kl_penalized_rewards(scores, old_logp, ref_logp, mask, beta)
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        adv, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        adv = rl.whiten(adv, mask)
        reward_total = (rewards * mask).sum(-1)
    else:
        reward_total = scores - beta * kl_seq
        adv = rl.group_advantages(reward_total, cfg.group_size, kind=cfg.advantage_estimator)[:, None] * mask
        returns = jnp.zeros_like(adv)
    metrics = dict(score=scores.mean(), kl=kl_seq.mean(), response_length=mask.sum(-1).mean(),
                   eos_rate=ended.mean(), reward_total=reward_total.mean())
    return adv, returns, metrics


def update_step(state, rollout, idx, ptx, bases=None, *, policy, value_model, policy_tx, value_tx, cfg, prompt_len):
    """One minibatch: policy (+ KL loss term, + ptx) and value gradient steps with their own optimizers,
    then the policy EMA. (state, rollout, minibatch indices, pretraining batch, frozen LoRA bases) ->
    (state, metrics); bases {'policy', 'value'}: the frozen base each trainable tree is combined with (None or
    absent: full fine-tuning). The reference's log-probs come with the rollout. Pure; no dropout (the first ratio
    must be exactly 1). `policy_step` then `value_step`: the stage jits the two apart, so that their gradients
    and activations are never held at once."""
    new, metrics = policy_step({k: v for k, v in state.items() if k != "value"}, rollout, idx, ptx, bases,
                               policy=policy, policy_tx=policy_tx, cfg=cfg, prompt_len=prompt_len)
    if "value" in state:
        new["value"], v_metrics = value_step(state["value"], rollout, idx, bases, value_model=value_model,
                                             value_tx=value_tx, cfg=cfg, prompt_len=prompt_len)
        metrics.update(v_metrics)
    return new, metrics


def _minibatch(rollout, idx):
    mb = jax.tree.map(lambda x: x[idx], rollout)
    return mb, (mb["tokens"], mb["positions"], mb["segments"])


def policy_step(state, rollout, idx, ptx, bases=None, *, policy, policy_tx, cfg, prompt_len):
    """The policy's half of `update_step` (state without 'value'): its gradient step and the EMA."""
    mb, rows = _minibatch(rollout, idx)
    p = prompt_len
    agg, max_tokens = loss_aggregation(cfg)

    def policy_loss(params):
        params = lora.combine(params, (bases or {}).get("policy"))
        logp, ent = scoring.response_logprobs(params, policy, *rows, p, cfg.temperature, entropy=True)
        loss, aux = losses.ppo_policy_loss(logp, mb["old_logp"], mb["advantages"], mb["mask"], cfg.clip_eps,
                                           agg=agg, max_tokens=max_tokens)
        aux = dict(aux, pg_loss=loss, entropy=losses.masked_mean(jax.lax.stop_gradient(ent), mb["mask"]))
        if cfg.kl_penalty == "loss":  # β·KL(π‖π_ref) as a loss term, with its own (correct) gradient
            kl, _ = losses.kl_loss(logp, mb["ref_logp"], mb["mask"], estimator=cfg.kl_estimator, agg=agg,
                                   max_tokens=max_tokens)
            loss = loss + state["kl_beta"] * kl
            aux["kl_loss"] = kl
        if cfg.ptx_coef > 0:  # PPO-ptx: γ · pretraining NLL on every minibatch
            aux["ptx_loss"] = ptx_nll(params, ptx, cfg.get("ptx_microbatch", 0) or ptx["tokens"].shape[0])
            loss = loss + cfg.ptx_coef * aux["ptx_loss"]
        return loss, aux

    def ptx_nll(params, rows, micro: int):
        """Mean token NLL of the pretraining rows, over micro-batches of `micro` rows (summed, then divided by
        all their tokens: the same mean). With more than one, each is recomputed in the backward pass
        (`jax.checkpoint`): one micro-batch's activations live at a time, for one more forward pass of the rows
        and a gradient accumulator (`plan.ptx_microbatch` weighs the two)."""
        def sums(params, r):
            hidden = policy.apply({"params": params}, r["tokens"], r["positions"], r["segment_ids"],
                                  return_hidden=True)
            logp = scoring.token_stats(params, policy, hidden, r["targets"])["logp"]  # chunked LM head
            mask = r["loss_mask"].astype(jnp.float32)
            return jnp.sum(-logp * mask), jnp.sum(mask)

        n = rows["tokens"].shape[0] // micro
        if n == 1:
            total, count = sums(params, rows)
        else:
            def body(acc, r):
                return jax.tree.map(jnp.add, acc, jax.checkpoint(sums)(params, r)), None
            split = jax.tree.map(lambda x: x.reshape(n, micro, *x.shape[1:]), rows)
            (total, count), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), split)
        return total / jnp.maximum(count, 1.0)

    (_, metrics), grads = jax.value_and_grad(policy_loss, has_aux=True)(state["policy"]["params"])
    new = dict(state, policy=train_lib.apply_gradients(state["policy"], grads, policy_tx),
               updates=state["updates"] + 1)
    metrics["policy_grad_norm"] = train_lib.global_norm(grads)
    # EMA from zero, read through `ema_params` with Adam's bias correction: a true average of the updates' policies
    new["ema"] = jax.tree.map(lambda e, x: cfg.ema_decay * e + (1 - cfg.ema_decay) * x, state["ema"],
                              new["policy"]["params"])
    return new, metrics


def value_step(value_state, rollout, idx, bases=None, *, value_model, value_tx, cfg, prompt_len):
    """The value model's half of `update_step`: (state['value'], ...) -> (its update, metrics)."""
    mb, rows = _minibatch(rollout, idx)

    def value_loss(params):
        v = scoring.response_values(lora.combine(params, (bases or {}).get("value")), value_model, *rows, prompt_len)
        loss, aux = losses.value_loss(v, mb["old_values"], mb["returns"], mb["mask"], cfg.value_clip_eps)
        return cfg.value_coef * loss, dict(aux, value_loss=loss)

    (_, metrics), grads = jax.value_and_grad(value_loss, has_aux=True)(value_state["params"])
    metrics["value_grad_norm"] = train_lib.global_norm(grads)
    return train_lib.apply_gradients(value_state, grads, value_tx), metrics


def init_state(reference, policy_tx, kl_coef: float, value_params=None, value_tx=None) -> dict:
    """The RL train state: policy (+ value) params with their optimizers, the EMA accumulator (from zero,
    see `ema_params`), the update count, the KL coefficient. Params are copied: the frozen reference and
    RM must survive the donated updates. (LoRA: `reference` / `value_params` are the trainable adapters
    and heads; their frozen bases stay outside the state.)"""
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    policy = copy(reference)
    state = {"step": jnp.zeros((), jnp.int32), "updates": jnp.zeros((), jnp.int32),
             "policy": {"params": policy, "opt_state": sharding.init_optimizer(policy_tx, policy)},
             "ema": jax.tree.map(jnp.zeros_like, reference), "kl_beta": rl.kl_controller_init(kl_coef)}
    if value_params is not None:
        value = copy(value_params)
        state["value"] = {"params": value, "opt_state": sharding.init_optimizer(value_tx, value)}
    return state


def ema_params(state, decay: float):
    """The bias-corrected EMA of the policy: ema / (1 − decay^updates) (the SFT weights weigh nothing).
    Before the first update there is nothing to average (the accumulator is all zeros): the policy itself."""
    updates = state["updates"]
    n = jnp.maximum(updates, 1).astype(jnp.float32)
    return jax.tree.map(lambda e, x: jnp.where(updates > 0, e / (1.0 - decay ** n), x), state["ema"],
                        state["policy"]["params"])


# ----------------------------------------------------------------------------- stage

def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Run the RL stage; exports the policy (and its bias-corrected EMA). Resumes from `workdir`."""
    check_config(config)
    if not config.init.from_workdir:
        raise UserError("config.init.from_workdir must name the SFT stage's workdir (policy and reference)")
    # --- mesh (and the config resolved: the SFT export's model, data paths checked)
    run = harness.Stage(config, workdir)
    config, mesh, cfg = run.config, run.mesh, run.config.ppo
    critic_free = cfg.advantage_estimator != "gae"

    # --- data: prompts (each repeated group_size times, consecutively) and pretraining text for ptx
    data = prepare.prepare_ppo(config, workdir, builtin_data)
    tok = data.tokenizer
    p, n, b, g = config.data.max_prompt_len, cfg.max_new_tokens, config.train.batch_size, cfg.group_size
    chunk = cfg.rollout_chunk or cfg.minibatch_size
    n_mb = b // cfg.minibatch_size
    updates_per_iteration = n_mb * cfg.ppo_epochs

    # --- init: policy and reference from SFT; reward model; value model (gae) from the RM, else from SFT.
    # LoRA: the policy is adapters on the SFT weights, which are also the reference (adapters off); the value
    # model is adapters + a scalar head on the reward model's trunk, which the frozen RM shares (no copies).
    sft, rng = run.source, jax.random.PRNGKey(config.seed)
    policy = Transformer(lora.model_config(config))
    manager = run.start(data, policy)
    reference = sft.params(lora.plain(policy), mesh)
    policy_init, policy_base = lora.setup(config, policy, reference, rng, mesh, adapter_params=run.adapter(policy))
    reference = policy_base if policy_base is not None else reference
    rm_model, rm_params, rm_bias, retokenize = None, None, 0.0, None
    if cfg.rm_workdir:
        rm = scoring.RewardModel.load(cfg.rm_workdir, mesh, model_overrides=harness.compute_keys(config))
        # an RM with another tokenizer scores decoded responses re-encoded host-side (None: the same tokenizer)
        retokenize = scoring.Retokenizer.load(cfg.rm_workdir, rm, tok)
        rm_model, rm_bias = rm.model, rm.bias
        rm_params = rm.params if retokenize is not None else lora.store_base(rm.params, config.lora.base_dtype)
        del rm  # (QLoRA: the float32 RM weights are freed once stored)
    verifier = load_verifier(cfg.verifier) if cfg.reward == "verifier" else None
    policy_tx = train_lib.make_optimizer(config.optim, config.train.num_steps, updates_per_iteration)
    value_model, value_params, value_tx, value_base = None, None, None, None
    if not critic_free:
        if rm_model is not None and retokenize is None:
            value_model, value_params = lora.with_lora(rm_model, config), rm_params
        else:  # no RM (verifier reward), or one reading other tokens: the SFT trunk with a fresh scalar head
            value_model = Transformer(policy.cfg, head="scalar")
            trunk = None if lora.enabled(config) else sft.path  # LoRA: the policy's frozen base is the trunk
            value_params = checkpoints.init_with_trunk(lora.plain(value_model), lora.plain(policy), mesh, rng, trunk)
            if lora.enabled(config):
                value_params = lora.combine({"scalar_head": value_params["scalar_head"]}, policy_base)
        if lora.enabled(config):  # adapters + the head train; the trunk is the (already stored) base
            value_base = value_params
            value_params = lora.combine({"scalar_head": jax.tree.map(jnp.copy, value_base["scalar_head"])},
                                        lora.init_adapters(value_model, jax.random.fold_in(rng, 1), mesh))
        value_tx = train_lib.make_optimizer(config.value_optim, config.train.num_steps, updates_per_iteration)
    state = init_state(policy_init, policy_tx, cfg.kl_coef, value_params, value_tx)
    del policy_init, value_params  # the state holds copies (LoRA: these were the only references: freed)
    bases = {"policy": policy_base, "value": value_base}
    full_policy = lambda s: lora.combine(s["policy"]["params"], policy_base)  # noqa: E731

    def set_data_state(saved):
        data.prompts.set_state(saved["prompts"])
        if data.ptx is not None:
            data.ptx.set_state(saved["ptx"])

    state, state_shardings = train_lib.place_and_resume(state, mesh, manager, set_data_state)
    data_state = lambda: {"prompts": data.prompts.get_state(),  # noqa: E731
                          "ptx": data.ptx.get_state() if data.ptx is not None else None}
    repl = sharding.replicated(mesh)

    # --- rollout: sampler and forward passes in chunks of `chunk` rows
    sampler = sampling.make_sampler(policy, max_new_tokens=n, eos_id=tok.eos_ids, pad_id=tok.pad_id,
                                    temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    forward = jax.jit(functools.partial(rollout_forward, policy=policy, value_model=value_model, rm_model=rm_model,
                                        eos_id=prepare.end_id(tok, data.chat_template), temperature=cfg.temperature,
                                        rm_bias=rm_bias))
    advantages_fn = jax.jit(functools.partial(advantages, cfg=cfg))

    def local_responses(sample):
        """This process's rows of the sampled responses, on the host (they line up with its prompts)."""
        local = b // jax.process_count()
        return sharding.to_host(sample["response"])[jax.process_index() * local:][:local]

    def verifier_scores(prompts, sample):
        """The verifier on this process's rows (decoded responses), as a global [B] array."""
        scores = [verifier(pr, tok.decode(r)) for pr, r in zip(prompts["prompt_text"], local_responses(sample))]
        return sharding.host_to_global({"s": np.asarray(scores, np.float32)}, mesh)["s"]

    def rollout(state, prompts, rng):
        """Sample and score one batch; returns (rollout arrays for the update, metrics)."""
        prompts = {k: np.repeat(v, g, axis=0) for k, v in prompts.items()}  # group_size samples per prompt
        glob = sharding.host_to_global(prompts, mesh)
        params = {"policy": full_policy(state), "reference": reference,
                  "rm": rm_params if retokenize is None else None,
                  "value": lora.combine(state["value"]["params"], value_base) if "value" in state else None}
        parts = []
        for c in range(0, b, chunk):
            s = sampler(params["policy"], glob["prompt_tokens"][c:c + chunk],
                        glob["prompt_mask"][c:c + chunk], rng, jnp.arange(c, c + chunk))  # chunking-invariant
            s["prompt_mask"] = glob["prompt_mask"][c:c + chunk]
            parts.append(dict(s, **forward(params, s)))
        s = {k: jnp.concatenate([x[k] for x in parts]) for k in parts[0] if k != "logits"}
        if retokenize is not None:
            scores = retokenize(tok, prompts, local_responses(s), mesh)
        else:
            scores = verifier_scores(prompts, s) if verifier is not None else s["scores"]
        adv, returns, metrics = advantages_fn(scores, s["old_logp"], s["ref_logp"], s.get("values"),
                                              s["response_mask"], s["ended"], state["kl_beta"])
        tokens, positions, segments = scoring.sequence_inputs(s["tokens"], s["prompt_mask"], s["response_mask"])
        batch = dict(tokens=tokens, positions=positions, segments=segments, mask=s["response_mask"],
                     old_logp=s["old_logp"], ref_logp=s["ref_logp"], advantages=adv)
        if "values" in s:
            batch.update(old_values=s["values"], returns=returns)
            metrics["explained_variance"] = rl.explained_variance(s["values"], returns, s["response_mask"])
        return batch, metrics

    # --- update
    if cfg.ptx_coef > 0:  # ptx_microbatch 0: chosen by the memory plan
        cfg = cfg.copy_and_resolve_references()
        cfg.ptx_microbatch = plan.ptx_microbatch(config, tuple(mesh.shape[a] for a in sharding.MESH_AXES))
    # `update_step` as two programs: the policy's and the value model's gradients never coexist
    policy_shardings = {k: v for k, v in state_shardings.items() if k != "value"}
    policy_fn = jax.jit(functools.partial(policy_step, policy=policy, policy_tx=policy_tx, cfg=cfg, prompt_len=p),
                        in_shardings=(policy_shardings, None, None, None, None),
                        out_shardings=(policy_shardings, repl), donate_argnums=0)
    value_fn = "value" in state and jax.jit(
        functools.partial(value_step, value_model=value_model, value_tx=value_tx, cfg=cfg, prompt_len=p),
        in_shardings=(state_shardings["value"], None, None, None),
        out_shardings=(state_shardings["value"], repl), donate_argnums=0)

    def update_fn(state, batch, idx, ptx, bases):
        new, metrics = policy_fn({k: v for k, v in state.items() if k != "value"}, batch, idx, ptx, bases)
        if value_fn:  # after the policy's program: on CPU independent programs may otherwise run at once
            jax.block_until_ready(new["updates"])
            new["value"], v_metrics = value_fn(state["value"], batch, idx, bases)
            metrics = {**metrics, **v_metrics}
        return new, metrics
    no_ptx = {"tokens": jnp.zeros((1, 1), jnp.int32)}  # placeholder when ptx_coef == 0

    def iteration(state, step):
        """Rollout a batch, then `ppo_epochs` shuffled passes of minibatch updates; returns host metrics."""
        it_rng = jax.random.fold_in(rng, step)
        t0 = time.perf_counter()
        batch, metrics = rollout(state, next(data.prompts), jax.random.fold_in(it_rng, 0))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t1 = time.perf_counter()
        updates = []
        for epoch in range(cfg.ppo_epochs):
            perm = jax.random.permutation(jax.random.fold_in(it_rng, 1 + epoch), b)
            for j in range(n_mb):
                ptx = sharding.host_to_global(next(data.ptx), mesh) if data.ptx is not None else no_ptx
                idx = perm[j * cfg.minibatch_size:(j + 1) * cfg.minibatch_size]
                state, mb_metrics = update_fn(state, batch, idx, ptx, bases)
                updates.append(mb_metrics)
        updates = jax.device_get(updates)
        metrics.update({k: float(np.mean([u[k] for u in updates])) for k in updates[0]})
        t2 = time.perf_counter()
        beta = rl.kl_update(state["kl_beta"], metrics["kl"], b, target=cfg.kl_target or None, horizon=cfg.kl_horizon)
        state["kl_beta"] = jax.device_put(jnp.float32(beta), repl)
        state["step"] = jax.device_put(jnp.int32(step), repl)
        tokens = b * (p + n)
        metrics.update(beta=float(beta), rollout_tokens_per_sec=tokens / (t1 - t0),
                       update_tokens_per_sec=tokens * cfg.ppo_epochs / (t2 - t1))
        return state, metrics

    def evaluate(state) -> dict:
        """Score (RM or verifier) and KL to SFT of the current policy's samples on held-out prompts."""
        scores, kls = [], []
        for i, prompts in enumerate(data.eval_prompts()):
            if config.train.eval_batches and i >= config.train.eval_batches:
                break
            if not np.asarray(prompts["prompt_mask"]).any(-1).all():
                break  # the final, padded batch: its empty rows have nothing to continue
            _, met = rollout(state, prompts, jax.random.PRNGKey(10_000 + i))
            scores.append(float(met["score"]))
            kls.append(float(met["kl"]))
        return {"eval_score": float(np.mean(scores)), "eval_kl": float(np.mean(kls))} if scores else {}

    # --- loop
    state, last = train_lib.fit(config=config, workdir=workdir, mesh=mesh, manager=manager, state=state,
                                step=iteration, data_state=data_state, evaluate_fn=evaluate,
                                finite_keys=("pg_loss", "value_loss", "score"), shown=("score", "kl"),
                                updates_per_step=updates_per_iteration,
                                tasks_fn=run.tasks(policy, data, full_policy))

    # --- save: the policy and its bias-corrected EMA, for the next stage / evaluation
    meta = {"step": int(state["step"]), "ptx_coef": cfg.ptx_coef, "kl_beta": float(state["kl_beta"]), "advantage_estimator": cfg.advantage_estimator,
            "reward": cfg.reward, "loss_agg": loss_aggregation(cfg)[0]}
    # (LoRA: merged; the EMA is that of the adapter factors A and B, merged as W + scale * EMA(A) EMA(B))
    run.export(state["policy"]["params"], data, base=policy_base, **meta)
    run.export(jax.jit(functools.partial(ema_params, decay=cfg.ema_decay))(state), data, name="export_ema",
               base=policy_base, **meta, ema_decay=cfg.ema_decay, ema_updates=int(state["updates"]))
    return last
