"""Pure loss functions for SFT, the reward model, PPO-ptx, DPO and SimPO (K-wise) and a KL loss term.

Every function here is pure, accepts numpy or jax arrays of any float dtype, and
computes in float32 (log-softmax included), so a bfloat16 model still gets float32
losses. Public functions are wrapped in `jax.jit` (as `jax.nn` does): eager calls
compile once per shape instead of op by op, and inside a caller's jit they inline.

Shapes: B = batch, T = sequence length, V = vocab, K = completions per prompt.
Masks are 0/1 (bool, int or float); positions where mask == 0 never contribute to a
loss, a gradient or a metric, whatever (padding, even inf) they hold.

Public API:
    masked_mean, token_logprobs, entropy,
    sft_loss, ptx_loss, rm_loss, ppo_policy_loss, value_loss, aggregate (AGGREGATIONS),
    dpo_loss (DPO_LOSS_TYPES), simpo_loss, kl_loss (KL_ESTIMATORS)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = [
    "masked_mean", "token_logprobs", "entropy", "sft_loss", "ptx_loss",
    "rm_loss", "ppo_policy_loss", "value_loss", "dpo_loss", "simpo_loss", "kl_loss", "aggregate",
    "DPO_LOSS_TYPES", "KL_ESTIMATORS", "AGGREGATIONS",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "plackett_luce")
KL_ESTIMATORS = ("k1", "k2", "k3")
# How per-token terms of a batch of responses become one loss (see `aggregate`).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


@functools.partial(jax.jit, static_argnames=("axis",))
def masked_mean(x, mask, axis=None):
    """Mean of `x` over positions where `mask` is nonzero, in float32.

    Args:
      x: array; mask: array broadcastable to x (0/1 or nonnegative weights).
      axis: int or tuple of ints to reduce (static; None = all).
    Returns:
      The weighted mean, reduced over `axis`; 0 (not NaN) where the mask sums to 0,
      so an empty batch gives a zero loss and zero gradients.
    """
    x = jnp.asarray(x, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
    # `where` rather than x * mask: garbage (inf) in masked slots must not leak as inf * 0 = NaN.
    total = jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


@jax.jit
def token_logprobs(logits, targets):
    """log softmax(logits)[targets] in float32.

    Args:
      logits: [B, T, V] (any float dtype).
      targets: [B, T] int token ids in [0, V); targets[b, t] is the label for logits[b, t].
    Returns:
      logp: [B, T] float32.
    """
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets, jnp.int32)
    # gather - logsumexp == log_softmax gathered, without a second [B, T, V] float32 buffer.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@jax.jit
def entropy(logits):
    """Entropy of softmax(logits) per position, float32. logits [B, T, V] -> [B, T]."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def target_is_max(logits, targets):
    """[B, T]: the target's logit is the row maximum (a tie counts as correct). Not argmax == target: argmax is
    a (value, index) reduce over the vocabulary that cost 355 ms of a GPT-2 CPU train step."""
    return jnp.take_along_axis(logits, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0] >= \
        jnp.max(logits, axis=-1)


def token_nll(logp, correct, mask):
    """Mean token NLL over the mask from per-token log-probs (and accuracy from `correct`): the loss of
    `sft_loss` / `ptx_loss` when the log-probs come from chunked logits (`scoring.token_stats`)."""
    mask = jnp.asarray(mask, jnp.float32)
    return masked_mean(-logp, mask), {"num_tokens": jnp.sum(mask), "accuracy": masked_mean(correct, mask)}


def _token_nll(logits, targets, mask):
    """Shared body of sft_loss and ptx_loss: mean token NLL over the mask + metrics."""
    return token_nll(token_logprobs(logits, targets), target_is_max(logits, targets), mask)


@jax.jit
def sft_loss(logits, targets, mask):
    """Supervised fine-tuning loss: mean token cross-entropy over all mask==1 positions.

    Every unmasked token of the batch weighs the same (long responses count more than
    short ones, as in a token-level LM loss).

    Args:
      logits: [B, T, V]; targets: [B, T] int, already shifted (label of logits[b, t]);
      mask: [B, T], 1 on response tokens that are trained on.
    Returns:
      (loss scalar float32, aux {'num_tokens', 'accuracy'}). loss is 0 for an all-zero mask.
      accuracy: fraction of masked tokens whose target has the highest logit (ties count).
    """
    return _token_nll(logits, targets, mask)


@jax.jit
def ptx_loss(logits, targets, mask):
    """Pretraining term of PPO-ptx: mean token NLL over the mask (γ is applied by the caller).

    Same shapes, computation and aux as `sft_loss`; a separate name so that the
    PPO step reads like the paper's objective.
    """
    return _token_nll(logits, targets, mask)


@jax.jit
def rm_loss(rewards, ranks, valid):
    """K-choose-2 Bradley–Terry reward-model loss.

    For each prompt b, every pair (i, j) of valid completions with ranks[b,i] < ranks[b,j]
    (i preferred) contributes -log σ(r_i − r_j). Tied pairs are dropped. A prompt's loss
    is the mean over its pairs (= the paper's 1/C(K,2) when there are no ties and no
    padding); the batch loss is the mean over prompts with at least one pair, so every
    prompt weighs the same however many completions it has.

    Args:
      rewards: [B, K] scalar rewards (any float dtype).
      ranks: [B, K] ints; 0 = best, lower is preferred, equal = tie.
      valid: [B, K] 0/1, marks real completions (ragged K is padded with valid = 0).
    Returns:
      (loss scalar, aux) with aux 'accuracy' (fraction of all valid untied pairs whose
      preferred completion scores strictly higher), 'num_pairs', 'num_prompts'
      (prompts with ≥ 1 pair). All zeros, never NaN, when there are no pairs.
    """
    r = jnp.asarray(rewards, jnp.float32)
    pair = _pair_mask(ranks, valid)
    diff = r[:, :, None] - r[:, None, :]
    loss, has_pairs = _prompt_then_batch_mean(-jax.nn.log_sigmoid(diff), pair, axis=(1, 2))
    aux = {
        "accuracy": masked_mean(diff > 0, pair),
        "num_pairs": jnp.sum(pair),
        "num_prompts": jnp.sum(has_pairs),
    }
    return loss, aux


def _pair_mask(ranks, valid):
    """[B, K, K] bool: entry (i, j) is the pair "i preferred over j" (both valid, rank_i < rank_j)."""
    ranks = jnp.asarray(ranks)
    valid = jnp.asarray(valid).astype(bool)
    return valid[:, :, None] & valid[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])


def _prompt_then_batch_mean(terms, weights, axis):
    """Per-prompt mean of `terms` over `weights` (reducing `axis`), then the mean over prompts
    with at least one term. Returns (loss scalar, has_terms [B] bool)."""
    per_prompt = masked_mean(terms, weights, axis=axis)
    has_terms = jnp.sum(weights, axis=axis) > 0
    return masked_mean(per_prompt, has_terms), has_terms


@functools.partial(jax.jit, static_argnames=("agg",))
def aggregate(per_token, mask, agg="token_mean", max_tokens=None):
    """One loss from per-token terms of a batch of responses, as each method's paper defines it.

      'token_mean'              Σ_valid s / (number of valid tokens): every token of the batch weighs the
                                same (PPO as usually implemented, DAPO).
      'seq_mean_token_mean'     mean over responses of each response's token mean: every response weighs
                                the same, its tokens 1/|o_i| each (GRPO, Shao et al. 2024 eq. 3).
      'seq_mean_token_sum'      mean over responses of each response's token sum: the sequence-level
                                REINFORCE loss −1/G Σ_i A_i log π(o_i) (RLOO, Ahmadian et al. 2024).
      'seq_mean_token_sum_norm' Σ_valid s / (rows · max_tokens), a constant normaliser: no length bias
                                (Dr. GRPO, Liu et al. 2025); max_tokens is the response length limit.

    A response with no valid token (a padded row) is left out of the response count of 'seq_mean_*'
    (it would only shrink the loss of the others); 'seq_mean_token_sum_norm' counts every row, since its
    normaliser is meant to be the same constant for every batch. All give 0, never NaN, for an all-zero mask.

    Args:
      per_token: [..., T] per-token terms; mask: the same shape, 0/1 (or nonnegative weights).
      agg: one of AGGREGATIONS (static).
      max_tokens: T_max > 0 (int or traced scalar), required for 'seq_mean_token_sum_norm' only.
    Returns:
      float32 scalar.
    """
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {', '.join(AGGREGATIONS)}; got {agg!r}")
    x = jnp.asarray(per_token, jnp.float32)
    mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), x.shape)
    if agg == "token_mean":
        return masked_mean(x, mask)
    row_sum = jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=-1)  # `where`: inf in padding must not leak
    if agg == "seq_mean_token_sum_norm":
        if max_tokens is None:
            raise ValueError("agg='seq_mean_token_sum_norm' needs max_tokens (the response length limit)")
        return jnp.sum(row_sum) / (row_sum.size * jnp.asarray(max_tokens, jnp.float32))
    per_seq = row_sum if agg == "seq_mean_token_sum" else masked_mean(x, mask, axis=-1)
    return masked_mean(per_seq, jnp.sum(mask, axis=-1) > 0)


@functools.partial(jax.jit, static_argnames=("agg",))
def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps, agg="token_mean", max_tokens=None):
    """PPO clipped surrogate loss (to minimise).

        s_t = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A),  ρ = exp(logp − old_logp),  loss = aggregate(s, mask, agg)

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy (differentiated).
      old_logp: [B, T] log-probs under the policy that sampled them (treated as constant).
      advantages: [B, T] (treated as constant; whiten them before, if wanted).
      mask: [B, T] 0/1 valid response tokens.
      clip_eps: ε (float or scalar array).
      agg: how tokens and responses are weighed, one of AGGREGATIONS (static; see `aggregate`):
        'token_mean' (PPO), 'seq_mean_token_mean' (GRPO), 'seq_mean_token_sum' (RLOO / REINFORCE),
        'seq_mean_token_sum_norm' (Dr. GRPO, with max_tokens).
      max_tokens: the response length limit, for 'seq_mean_token_sum_norm'.
    Returns:
      (loss scalar, aux) with token means over all valid tokens of the batch (whatever `agg`):
        'clipfrac': fraction of tokens where the clip binds, i.e. the clipped term is the one selected
          and differs (ρ > 1+ε with A > 0, or ρ < 1−ε with A < 0): the tokens whose gradient it cuts;
        'approx_kl': ½(logp − old_logp)², the second-order ("k2") estimate of KL(π_old ‖ π) from
          samples of π_old; it is ≥ 0 and unbiased to second order, unlike the raw mean of
          old_logp − logp, which is noisy and can go negative.
    """
    mask = jnp.asarray(mask, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))
    # Zero the log-ratio on padding before exp: exp(garbage) = inf there would turn into
    # NaN gradients through the masked `where` (0 · inf).
    log_ratio = jnp.where(mask > 0, jnp.asarray(logp, jnp.float32) - old_logp, 0.0)
    ratio = jnp.exp(log_ratio)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    loss = aggregate(-surrogate, mask, agg, max_tokens)
    binds = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
    aux = {
        "clipfrac": masked_mean(binds, mask),
        "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), mask),
    }
    return loss, aux


@jax.jit
def value_loss(values, old_values, returns, mask, clip_eps):
    """Clipped value loss (PPO2 style).

        loss = ½ · mean_mask max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²)

    Args:
      values: [B, T] current value predictions (differentiated).
      old_values: [B, T] predictions at rollout time; returns: [B, T] targets (constants).
      mask: [B, T] 0/1; clip_eps: ε.
    Returns:
      (loss scalar, aux) with 'vf_clipfrac': fraction of masked tokens where the clipped
      term is the larger one, i.e. where the clip is active (gradient cut).
    """
    mask = jnp.asarray(mask, jnp.float32)
    v = jnp.asarray(values, jnp.float32)
    v_old = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    ret = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))
    v_clipped = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
    unclipped = jnp.square(v - ret)
    clipped = jnp.square(v_clipped - ret)
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": masked_mean(clipped > unclipped, mask)}


@functools.partial(jax.jit, static_argnames=("loss_type", "ipo_token_mean", "pl_normalize"))
def dpo_loss(logp, ref_logp, ranks, valid, beta, loss_type="sigmoid", *, lengths=None, ipo_token_mean=False,
             pl_normalize=True):
    """Direct preference optimisation over K ranked completions per prompt (offline, no reward model).

    Δ_i = logp_i − ref_logp_i is the policy's log-likelihood ratio against the frozen reference
    for completion i (summed over its response tokens); βΔ_i is its implicit reward. Pairs, ties,
    ragged K and the averaging are exactly as in `rm_loss`: every pair (w, l) of valid completions
    with rank_w < rank_l (w preferred; ties dropped), a prompt's loss is the mean over its terms,
    the batch loss the mean over prompts with at least one term.

      'sigmoid' (Rafailov et al. 2023): per pair −log σ(β(Δ_w − Δ_l)). With all C(K,2) pairs this
          is exactly `rm_loss(β·Δ, ranks, valid)`: the Bradley–Terry loss on the implicit rewards.
      'ipo' (Azar et al. 2023): per pair ((Δ_w − Δ_l) − 1/(2β))², a squared loss that regresses
          the margin to 1/(2β) instead of pushing it to infinity. Δ is the paper's summed log-ratio;
          ipo_token_mean=True uses Δ_i / lengths_i, its mean over the completion's tokens (TRL's IPO), for
          the loss and every aux metric alike.
      'plackett_luce' (listwise, Rafailov et al. 2023 App. A.3): for each valid i not in the
          worst-ranked group of its prompt, the stage term −βΔ_i + log Σ_{valid j: rank_j ≥ rank_i} exp(βΔ_j)
          (a tied group shares one risk set: Breslow). pl_normalize=True: a prompt's loss is the mean of
          its stage terms (each prompt weighs the same whatever its K, like the pairwise losses and the
          RM's 1/C(K,2)); False: their sum, the paper's negative log-likelihood of the whole ranking.
          For K = 2 without a tie both equal 'sigmoid'.

    Args:
      logp: [B, K] summed response log-probs of each completion under the policy (differentiated).
      ref_logp: [B, K] the same under the frozen reference (a constant: stop_gradient).
      ranks: [B, K] ints; 0 = best, lower is preferred, equal = tie.
      valid: [B, K] 0/1, real completions (ragged K padded with valid = 0; padded slots may hold
        anything, inf included: they never reach the loss, its gradient or a metric).
      beta: β > 0 (float or traced scalar).
      loss_type: one of DPO_LOSS_TYPES (static).
      lengths: [B, K] response token counts of the completions (the tokens summed in logp), for
        ipo_token_mean; a valid completion with 0 tokens has Δ = 0.
      ipo_token_mean: (static, 'ipo' only) per-token mean log-ratios instead of sums.
      pl_normalize: (static, 'plackett_luce' only; False elsewhere is an error) mean (True) or sum (False)
        over a prompt's stages.
    Returns:
      (loss scalar float32, aux) with aux
        'accuracy': fraction of all valid untied pairs of the batch with Δ_w > Δ_l (strictly);
        'num_pairs', 'num_prompts' (prompts with ≥ 1 pair, the ones that enter the mean);
        'chosen_reward', 'rejected_reward': mean over those pairs of βΔ_w and βΔ_l;
        'margin': chosen_reward − rejected_reward (mean β(Δ_w − Δ_l) over pairs).
      All zeros, never NaN, when there are no pairs.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if ipo_token_mean and (loss_type != "ipo" or lengths is None):
        raise ValueError(f"dpo_loss: ipo_token_mean=True needs loss_type='ipo' and lengths; got "
                         f"loss_type={loss_type!r}, lengths {'given' if lengths is not None else 'None'}")
    if not pl_normalize and loss_type != "plackett_luce":
        raise ValueError(f"dpo_loss: pl_normalize=False applies to loss_type='plackett_luce' only, got {loss_type!r}")
    valid = jnp.asarray(valid).astype(bool)
    ranks = jnp.asarray(ranks)
    beta = jnp.asarray(beta, jnp.float32)
    # `where`, not a product: inf − inf = NaN in a padded slot must not leak (its cotangent is 0).
    ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
    delta = jnp.where(valid, jnp.asarray(logp, jnp.float32) - ref_logp, 0.0)
    if ipo_token_mean:
        delta = delta / jnp.maximum(jnp.where(valid, jnp.asarray(lengths, jnp.float32), 1.0), 1.0)
    implicit = beta * delta
    pair = _pair_mask(ranks, valid)
    diff = delta[:, :, None] - delta[:, None, :]
    if loss_type == "sigmoid":
        loss, has_pairs = _prompt_then_batch_mean(-jax.nn.log_sigmoid(beta * diff), pair, axis=(1, 2))
    elif loss_type == "ipo":
        loss, has_pairs = _prompt_then_batch_mean(jnp.square(diff - 0.5 / beta), pair, axis=(1, 2))
    else:
        # Risk set of i: valid j ranked no better than i (i itself and its ties included). The diagonal
        # is forced in so that a padded row has a finite logsumexp (0); such rows carry no weight.
        risk = (valid[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])) | jnp.eye(delta.shape[1], dtype=bool)
        lse = jax.nn.logsumexp(jnp.where(risk, implicit[:, None, :], -jnp.inf), axis=-1)
        # i is preferred over someone <=> valid and not in its prompt's worst-ranked group.
        stage = jnp.any(pair, axis=2)
        if pl_normalize:
            loss, has_pairs = _prompt_then_batch_mean(lse - implicit, stage, axis=1)
        else:
            has_pairs = jnp.any(stage, axis=1)
            loss = masked_mean(jnp.sum(jnp.where(stage, lse - implicit, 0.0), axis=1), has_pairs)
    return loss, _pair_aux(implicit, diff, pair, has_pairs)


def _pair_aux(reward, diff, pair, has_pairs) -> dict:
    """Metrics of a pairwise preference loss over rewards [B, K] (diff = r_i − r_j, pair = i preferred to j)."""
    chosen = masked_mean(jnp.broadcast_to(reward[:, :, None], pair.shape), pair)
    rejected = masked_mean(jnp.broadcast_to(reward[:, None, :], pair.shape), pair)
    return {"accuracy": masked_mean(diff > 0, pair), "num_pairs": jnp.sum(pair), "num_prompts": jnp.sum(has_pairs),
            "chosen_reward": chosen, "rejected_reward": rejected, "margin": chosen - rejected}


@jax.jit
def simpo_loss(logp, lengths, ranks, valid, beta, gamma):
    """SimPO (Meng, Xia, Chen 2024): reference-free preference optimisation over K ranked completions per prompt.

    The reward of completion i is its length-normalised log-likelihood r_i = β · logp_i / lengths_i (the
    average log-prob of its tokens, times β; no reference model). Each pair (w, l) of valid completions with
    rank_w < rank_l (w preferred; ties dropped) contributes −log σ(r_w − r_l − γ): a Bradley–Terry loss that
    asks for a target margin γ. Pairs, ties, ragged K and the averaging are exactly as in `rm_loss` /
    `dpo_loss`: a prompt's loss is the mean over its pairs, the batch loss the mean over prompts with ≥ 1 pair.

    Args:
      logp: [B, K] summed completion log-probs of each completion under the policy (differentiated).
      lengths: [B, K] completion token counts (the tokens summed in `logp`; ≥ 1 where valid).
      ranks: [B, K] ints; 0 = best, lower is preferred, equal = tie.
      valid: [B, K] 0/1, real completions (ragged K padded with valid = 0; padded slots may hold
        anything, inf or a zero length included: they never reach the loss, its gradient or a metric).
      beta: β > 0, the reward scale; gamma: γ ≥ 0, the target margin (floats or traced scalars).
    Returns:
      (loss scalar float32, aux) with aux
        'accuracy': fraction of all valid untied pairs of the batch with r_w > r_l (strictly);
        'num_pairs', 'num_prompts' (prompts with ≥ 1 pair, the ones that enter the mean);
        'chosen_reward', 'rejected_reward': mean over those pairs of r_w and r_l;
        'margin': chosen_reward − rejected_reward (mean r_w − r_l over pairs; compare with γ).
      All zeros, never NaN, when there are no pairs.
    """
    valid = jnp.asarray(valid).astype(bool)
    length = jnp.where(valid, jnp.asarray(lengths, jnp.float32), 1.0)
    # `where`, not a product: garbage in a padded slot (inf, 0 / 0) must not leak (its cotangent is 0).
    reward = jnp.where(valid, jnp.asarray(beta, jnp.float32) * jnp.asarray(logp, jnp.float32) / length, 0.0)
    pair = _pair_mask(ranks, valid)
    diff = reward[:, :, None] - reward[:, None, :]
    terms = -jax.nn.log_sigmoid(diff - jnp.asarray(gamma, jnp.float32))
    loss, has_pairs = _prompt_then_batch_mean(terms, pair, axis=(1, 2))
    return loss, _pair_aux(reward, diff, pair, has_pairs)


def _kl_terms(logp, ref_logp, estimator):
    """Per-token KL(π ‖ π_ref) estimator values from tokens sampled from π, float32 (shared with
    rl.per_token_kl). log r = ref_logp − logp; k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_r = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * jnp.square(log_r)
    return jnp.expm1(log_r) - log_r  # expm1: exact near r = 1, where the policy starts


@functools.partial(jax.jit, static_argnames=("estimator", "agg"))
def kl_loss(logp, ref_logp, mask, estimator="k3", agg="token_mean", max_tokens=None):
    """KL penalty as a loss term (GRPO style): a per-token KL estimator aggregated like the policy loss.

    Gradients flow through `logp` (the current policy's log-probs of the sampled tokens);
    `ref_logp` is a constant. Its *value* estimates KL(π ‖ π_ref) without bias for k1 and k3
    (k2 is biased, exact to second order). Its *gradient* is what matters for a loss term: with
    the tokens sampled from the current π (on-policy), the expected gradient of a token's term is

      'k1' (log π − log π_ref):          E_π[∇ log π] = 0. No signal, only noise: k1 as a loss
                                          term is wrong; put k1 in the reward instead
                                          (`rl.kl_penalized_rewards`, score-function gradient).
      'k2' (½(log π − log π_ref)²):      ∇ KL(π ‖ π_ref) exactly.
      'k3' ((r − 1) − log r, r = π_ref/π): ∇ KL(π_ref ‖ π), the *reverse* KL. It agrees with
                                          ∇ KL(π ‖ π_ref) to first order near the reference and
                                          drifts from it as π moves away. GRPO's choice.

    (A sequence's tokens each contribute the gradient of the next-token KL at their sampled
    prefix; how θ changes which prefixes are sampled is not differentiated here.)

    Args:
      logp: [B, T] log-probs of the sampled tokens under the current policy (differentiated).
      ref_logp: [B, T] log-probs of the same tokens under the frozen reference (stop_gradient).
      mask: [B, T] 0/1 valid response tokens; masked slots may hold anything (inf included).
      estimator: one of KL_ESTIMATORS (static); default 'k3'.
      agg, max_tokens: as in `ppo_policy_loss` (see `aggregate`); use the policy loss's, so that the
        KL term weighs tokens as the objective it is part of (GRPO's eq. 3 has it inside the token mean).
    Returns:
      (loss scalar float32 — multiply by β yourself —, aux) with aux 'num_tokens' and 'k1'
      (token mean of log π − log π_ref over valid tokens, the plain unbiased KL estimate, for logging).
      0 for an all-zero mask.
    """
    mask = jnp.asarray(mask, jnp.float32)
    ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
    # Zero the log-ratio on padding before the estimator: exp(garbage) there would give NaN gradients.
    logp = jnp.where(mask > 0, jnp.asarray(logp, jnp.float32), 0.0)
    ref_logp = jnp.where(mask > 0, ref_logp, 0.0)
    loss = aggregate(_kl_terms(logp, ref_logp, estimator), mask, agg, max_tokens)
    return loss, {"num_tokens": jnp.sum(mask), "k1": masked_mean(logp - ref_logp, mask)}
