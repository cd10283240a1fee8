"""Pure RL math for PPO on language models: KL-shaped rewards, GAE, whitening, KL control.

All functions are pure, accept numpy or jax arrays and compute in float32. The array
functions are wrapped in `jax.jit` (as `jax.nn` does; string/bool options are static),
so eager calls compile once per shape and calls inside a caller's jit simply inline.
Per-token arrays are [B, T] over the sampled response; `mask` [B, T] is 1 on valid
response tokens (a contiguous run, normally a prefix: the response up to and including
EOS) and 0 on padding. kl_penalized_rewards, gae and whiten return 0 on padding.

Public API (see DESIGN.md §4):
    per_token_kl, kl_penalized_rewards, gae, whiten, explained_variance,
    kl_controller_init, fixed_kl_update, adaptive_kl_update, kl_update
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from instructgpt_jax.losses import masked_mean

__all__ = [
    "per_token_kl", "kl_penalized_rewards", "gae", "whiten", "explained_variance",
    "kl_controller_init", "fixed_kl_update", "adaptive_kl_update", "kl_update",
]

KL_ESTIMATORS = ("k1", "k3")


@functools.partial(jax.jit, static_argnames=("kl_estimator",))
def per_token_kl(logp, ref_logp, kl_estimator="k1"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    Args:
      logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy and reference.
      kl_estimator: 'k1' = logp − ref_logp (unbiased, can be negative; the paper's penalty)
        or 'k3' = (r − 1) − log r with r = π_ref/π = exp(ref_logp − logp) (unbiased,
        always ≥ 0, lower variance; Schulman, "Approximating KL divergence", 2020).
    Returns:
      [B, T] float32 (not masked).
    """
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jnp.asarray(ref_logp, jnp.float32)
    if kl_estimator == "k1":
        return logp - ref_logp
    if kl_estimator == "k3":
        log_r = ref_logp - logp
        return jnp.expm1(log_r) - log_r  # expm1: exact near r = 1, where the policy starts
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")


@functools.partial(jax.jit, static_argnames=("kl_estimator",))
def kl_penalized_rewards(scores, logp, ref_logp, mask, beta, *, kl_estimator="k1"):
    """Per-token rewards of the InstructGPT objective: r_t = −β·KL_t, plus the RM score at the end.

    Args:
      scores: [B] reward-model scores of the full responses (bias already applied).
      logp: [B, T] log-probs of the sampled tokens under the rollout policy.
      ref_logp: [B, T] log-probs of the same tokens under the frozen SFT reference.
      mask: [B, T] 0/1, valid response tokens (contiguous).
      beta: KL coefficient (float or traced scalar, e.g. from an adaptive controller).
      kl_estimator: 'k1' (default, the paper's) or 'k3'; static (a Python string).
    Returns:
      rewards [B, T] float32: −β·KL_t on valid tokens, 0 elsewhere, and scores[b] added at
      the last valid token of row b (a row with no valid token gets nothing).
    """
    mask = jnp.asarray(mask).astype(bool)
    scores = jnp.asarray(scores, jnp.float32)
    kl = per_token_kl(logp, ref_logp, kl_estimator)
    rewards = jnp.where(mask, -beta * kl, 0.0)
    # Last valid index per row (-1 for an empty row, which then matches no position).
    # Taking the max valid position rather than sum(mask) - 1 also handles left padding.
    pos = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask, pos, -1), axis=-1)
    return rewards + jnp.where(pos == last[:, None], scores[:, None], 0.0)


@jax.jit
def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   R_t = A_t + V_t

    The episode ends after the last valid token, so values (and rewards) past it count
    as 0: the final token bootstraps from nothing.

    Args:
      rewards, values: [B, T]; mask: [B, T] 0/1, contiguous valid run per row.
      gamma: discount (the paper uses 1); lam: GAE λ. Floats or traced scalars.
    Returns:
      (advantages [B, T], returns [B, T]) float32, both 0 on masked positions.
    """
    mask = jnp.asarray(mask, jnp.float32)
    rewards = jnp.asarray(rewards, jnp.float32) * mask
    values = jnp.asarray(values, jnp.float32) * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(next_adv, xs):
        delta, m = xs
        adv = (delta + gamma * lam * next_adv) * m  # m = 0 cuts the chain at padding
        return adv, adv

    # Scan over time (leading axis), from the last position back to the first.
    _, adv_t = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32),
                            (deltas.T, mask.T), reverse=True)
    advantages = adv_t.T
    return advantages, (advantages + values) * mask


@functools.partial(jax.jit, static_argnames=("shift_mean",))
def whiten(x, mask, shift_mean=True):
    """Normalise x to zero mean, unit variance over all masked positions of the batch.

    Uses the masked mean and population variance (no Bessel correction), eps = 1e-8.

    Args:
      x: [B, T] (any shape matching mask); mask: 0/1 same shape.
      shift_mean: if False only rescale, keeping the original mean (used for rewards,
        whose sign carries meaning).
    Returns:
      float32 array of x's shape, 0 on masked positions.
    """
    mask = jnp.asarray(mask, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask > 0, out, 0.0)


@jax.jit
def explained_variance(values, returns, mask):
    """1 − Var(returns − values) / Var(returns) over masked positions (a PPO metric).

    1 = perfect value function, 0 = no better than a constant, < 0 = worse.
    Args: values, returns, mask: [B, T]. Returns a float32 scalar; 0 when Var(returns) = 0
    (undefined; 0 keeps logged metrics NaN-free).
    """
    mask = jnp.asarray(mask, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    returns = jnp.asarray(returns, jnp.float32)

    def var(y):
        return masked_mean(jnp.square(y - masked_mean(y, mask)), mask)

    var_ret = var(returns)
    safe = jnp.where(var_ret > 0, var_ret, 1.0)
    return jnp.where(var_ret > 0, 1.0 - var(returns - values) / safe, 0.0)


# --- KL controllers -------------------------------------------------------------------
# The controller state is just β as a float32 scalar array: a pytree leaf that can live
# in the train state, be updated inside jit, and be checkpointed with everything else.


def kl_controller_init(init_beta):
    """Initial controller state: β as a float32 scalar array."""
    return jnp.asarray(init_beta, jnp.float32)


def fixed_kl_update(beta, observed_kl=None, n_steps=None):
    """Fixed KL controller (the paper's): β is left unchanged."""
    del observed_kl, n_steps
    return jnp.asarray(beta, jnp.float32)


@jax.jit
def adaptive_kl_update(beta, observed_kl, n_steps, target, horizon):
    """Adaptive KL controller of Ziegler et al. 2019 (arXiv 1909.08593, §2.2).

        e = clip(observed_kl / target − 1, −0.2, 0.2);   β ← β · (1 + e · n_steps / horizon)

    Args:
      beta: current β; observed_kl: mean per-sequence KL of the last batch;
      n_steps: number of episodes (samples) in that batch; target: KL target;
      horizon: episodes over which β may change by about e^{±0.2}.
    Returns:
      new β, float32 scalar.
    """
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target - 1.0, -0.2, 0.2)
    return jnp.asarray(beta, jnp.float32) * (1.0 + error * n_steps / horizon)


def kl_update(beta, observed_kl, n_steps, target=None, horizon=10000):
    """Dispatch for configs: fixed controller when target is None, else adaptive."""
    if target is None:
        return fixed_kl_update(beta)
    return adaptive_kl_update(beta, observed_kl, n_steps, target, horizon)
