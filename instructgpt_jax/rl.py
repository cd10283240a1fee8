"""Pure RL math for language models: KL-shaped rewards, GAE, whitening, KL control, group advantages.

All functions are pure, accept numpy or jax arrays and compute in float32. The array
functions are wrapped in `jax.jit` (as `jax.nn` does; string/bool/size options are static),
so eager calls compile once per shape and calls inside a caller's jit simply inline.
Per-token arrays are [B, T] over the sampled response; `mask` [B, T] is 1 on valid
response tokens (a contiguous run, normally a prefix: the response up to and including
EOS) and 0 on padding. kl_penalized_rewards, gae and whiten return 0 on padding.

Public API:
    per_token_kl (KL_ESTIMATORS), kl_penalized_rewards, gae, whiten, explained_variance,
    kl_controller_init, fixed_kl_update, adaptive_kl_update, kl_update,
    group_advantages (GROUP_ADVANTAGE_KINDS)
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from instructgpt_jax.losses import KL_ESTIMATORS, _kl_terms, masked_mean

__all__ = [
    "per_token_kl", "kl_penalized_rewards", "gae", "whiten", "explained_variance",
    "kl_controller_init", "fixed_kl_update", "adaptive_kl_update", "kl_update",
    "group_advantages", "KL_ESTIMATORS", "GROUP_ADVANTAGE_KINDS",
]

GROUP_ADVANTAGE_KINDS = ("grpo", "dr_grpo", "rloo")


@functools.partial(jax.jit, static_argnames=("kl_estimator",))
def per_token_kl(logp, ref_logp, kl_estimator="k1"):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (a metric; rewards use k1).

    With r = π_ref/π = exp(ref_logp − logp) (Schulman, "Approximating KL divergence", 2020):
      'k1' = logp − ref_logp = −log r: unbiased, can be negative; the paper's penalty.
      'k2' = ½(log r)²: ≥ 0, low variance, biased (exact to second order near the reference).
      'k3' = (r − 1) − log r: unbiased, ≥ 0, lower variance than k1.
    For the *gradient* each gives as a loss term see `losses.kl_loss`.

    Args:
      logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy and reference.
      kl_estimator: one of KL_ESTIMATORS (static).
    Returns:
      [B, T] float32 (not masked).
    """
    return _kl_terms(logp, ref_logp, kl_estimator)


@jax.jit
def kl_penalized_rewards(scores, logp, ref_logp, mask, beta):
    """Per-token rewards of the InstructGPT objective: r_t = −β·(logp_t − ref_logp_t), plus the RM score at the end.

    Always the k1 log-ratio: PPO / REINFORCE treat rewards as constants, and the score-function
    gradient of E_π[−β·k1] is exactly −β·∇KL(π ‖ π_ref). With k3 in the reward it would be
    −β·(∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π)), which vanishes near the reference: the penalty silently
    disappears. Use k2 / k3 as a loss term (`losses.kl_loss`) instead, and `per_token_kl` for metrics.

    Args:
      scores: [B] reward-model scores of the full responses (bias already applied).
      logp: [B, T] log-probs of the sampled tokens under the rollout policy.
      ref_logp: [B, T] log-probs of the same tokens under the frozen SFT reference.
      mask: [B, T] 0/1, valid response tokens (contiguous).
      beta: KL coefficient (float or traced scalar, e.g. from an adaptive controller).
    Returns:
      rewards [B, T] float32: −β·(logp − ref_logp) on valid tokens, 0 elsewhere, and scores[b]
      added at the last valid token of row b (a row with no valid token gets nothing).
    """
    mask = jnp.asarray(mask).astype(bool)
    scores = jnp.asarray(scores, jnp.float32)
    kl = jnp.asarray(logp, jnp.float32) - jnp.asarray(ref_logp, jnp.float32)
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


# --- Critic-free RL ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("group_size", "kind"))
def group_advantages(scores, group_size, kind="grpo"):
    """Per-sample advantages from a group of samples of the same prompt (no value model).

    Rows come in consecutive groups of `group_size` samples of one prompt (rows
    [g·G, (g+1)·G) are group g). With mean_g and the unbiased std_g (ddof 1) of the group:
      'grpo' (Shao et al. 2024):     (r − mean_g) / (std_g + 1e-4)
      'dr_grpo' (Liu et al. 2025):   r − mean_g   (no std division: no difficulty bias)
      'rloo' (Ahmadian et al. 2024): r_i − mean of the other G − 1 samples of its group
                                     (= G/(G−1)·(r_i − mean_g)), a leave-one-out baseline.
    A sequence's advantage is then used for each of its tokens.

    Args:
      scores: [B] per-sample rewards (RM score or verifier), B a multiple of group_size.
      group_size: G, samples per prompt (static int; ≥ 2 for 'grpo' and 'rloo').
      kind: one of GROUP_ADVANTAGE_KINDS (static).
    Returns:
      advantages [B] float32.
    """
    if kind not in GROUP_ADVANTAGE_KINDS:
        raise ValueError(f"group_advantages: kind must be one of {GROUP_ADVANTAGE_KINDS}, got {kind!r}")
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 1:
        raise ValueError(f"group_advantages: scores must be [B], got shape {scores.shape}")
    n = scores.shape[0]
    minimum = 1 if kind == "dr_grpo" else 2
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < minimum:
        raise ValueError(f"group_advantages: group_size must be an int >= {minimum} for kind={kind!r}, "
                         f"got {group_size!r}")
    if n % group_size:
        raise ValueError(f"group_advantages: batch of {n} scores is not a multiple of group_size={group_size}")
    group_size = int(group_size)
    groups = scores.reshape(n // group_size, group_size)
    centred = groups - jnp.mean(groups, axis=1, keepdims=True)
    if kind == "dr_grpo":
        adv = centred
    elif kind == "rloo":
        adv = centred * (group_size / (group_size - 1))
    else:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (group_size - 1))
        adv = centred / (std + 1e-4)
    return adv.reshape(n)
