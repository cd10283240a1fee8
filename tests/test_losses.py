"""Tests for instructgpt_jax.losses: hand-computed cases and brute-force references."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses

LOG3 = math.log(3.0)


def softplus(x):  # -log σ(d) == softplus(-d)
    return math.log1p(math.exp(x))


# --- masked_mean -------------------------------------------------------------------------

def test_masked_mean_hand():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, np.inf]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(losses.masked_mean(x, mask), 7.0 / 3.0, rtol=1e-6)
    np.testing.assert_allclose(losses.masked_mean(x, mask, axis=1), [1.5, 4.0], rtol=1e-6)
    # Empty mask: 0, not NaN; the inf in a masked slot never leaks.
    assert float(losses.masked_mean(x, np.zeros_like(mask))) == 0.0


# --- token_logprobs / entropy ----------------------------------------------------------------

def test_token_logprobs_and_entropy_hand():
    logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    targets = np.array([[2, 0]])
    lse = math.log(math.e + math.e**2 + math.e**3)
    out = losses.token_logprobs(logits, targets)
    assert out.shape == (1, 2) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[3.0 - lse, -math.log(3.0)]], rtol=1e-6)
    # p = [1/4, 3/4] from logits [0, log 3]; uniform over 4 gives log 4.
    ent = losses.entropy(np.array([[[0.0, LOG3], [0.0, 0.0]]]))
    np.testing.assert_allclose(ent, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2.0)]],
                               rtol=1e-6)
    np.testing.assert_allclose(losses.entropy(np.zeros((1, 1, 4))), [[math.log(4.0)]], rtol=1e-6)


# --- sft_loss / ptx_loss -------------------------------------------------------------------

# logits [0, log 3] give p = [1/4, 3/4]; [0, 0] give [1/2, 1/2].
SFT_LOGITS = np.array([[[0.0, LOG3], [LOG3, 0.0]],
                       [[0.0, 0.0], [50.0, -50.0]]], np.float32)
SFT_TARGETS = np.array([[1, 1], [0, 1]])
SFT_MASK = np.array([[1, 1], [1, 0]])
# token NLLs: -log 3/4 (argmax right), -log 1/4 (wrong), log 2 (argmax 0 == target, right); 4th masked.
SFT_EXPECTED = (-math.log(0.75) - math.log(0.25) + math.log(2.0)) / 3.0


def test_sft_loss_hand():
    loss, aux = losses.sft_loss(SFT_LOGITS, SFT_TARGETS, SFT_MASK)
    np.testing.assert_allclose(loss, SFT_EXPECTED, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], 2.0 / 3.0, rtol=1e-6)
    assert float(aux["num_tokens"]) == 3.0
    # A tie for the highest logit counts as correct whichever tied token is the target.
    _, aux = losses.sft_loss(SFT_LOGITS, np.array([[1, 1], [1, 1]]), SFT_MASK)
    np.testing.assert_allclose(aux["accuracy"], 2.0 / 3.0, rtol=1e-6)


def test_sft_loss_bf16_is_float32_and_grad_ignores_mask():
    loss, _ = losses.sft_loss(jnp.asarray(SFT_LOGITS, jnp.bfloat16), SFT_TARGETS, SFT_MASK)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, SFT_EXPECTED, rtol=1e-2)
    g = jax.grad(lambda lg: losses.sft_loss(lg, SFT_TARGETS, SFT_MASK)[0])(jnp.asarray(SFT_LOGITS))
    np.testing.assert_array_equal(g[1, 1], [0.0, 0.0])
    # d NLL / d logits = (softmax - onehot) / num_tokens at token (0, 0): ([1/4, 3/4] - [0, 1]) / 3.
    np.testing.assert_allclose(g[0, 0], [0.25 / 3, -0.25 / 3], rtol=1e-5)


def test_sft_loss_empty_mask_is_zero_not_nan():
    mask = np.zeros_like(SFT_MASK)
    loss, aux = losses.sft_loss(SFT_LOGITS, SFT_TARGETS, mask)
    assert float(loss) == 0.0 and float(aux["accuracy"]) == 0.0 and float(aux["num_tokens"]) == 0.0
    g = jax.grad(lambda lg: losses.sft_loss(lg, SFT_TARGETS, mask)[0])(jnp.asarray(SFT_LOGITS))
    np.testing.assert_array_equal(g, np.zeros_like(SFT_LOGITS))


def test_ptx_loss_matches_sft_and_jit():
    loss, aux = jax.jit(losses.ptx_loss)(SFT_LOGITS, SFT_TARGETS, SFT_MASK)
    np.testing.assert_allclose(loss, SFT_EXPECTED, rtol=1e-6)
    assert float(aux["num_tokens"]) == 3.0


# --- rm_loss -----------------------------------------------------------------------------

def test_rm_loss_hand():
    rewards = np.array([[1.0, 0.0, 2.0], [0.5, -0.5, 9.0], [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]])
    ranks = np.array([[0, 1, 2], [1, 0, 0], [0, 0, 0], [0, 1, 1]])
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0]])
    # prompt 0: pairs (0>1): d=1, (0>2): d=-1, (1>2): d=-2; only the first is ranked correctly.
    p0 = (softplus(-1.0) + softplus(1.0) + softplus(2.0)) / 3.0
    # prompt 1: completion 2 is padding, so the only pair is 1 > 0: d = -0.5 - 0.5 = -1 (wrong).
    p1 = softplus(1.0)
    # prompt 2: all tied -> no pairs, excluded from the mean over prompts.
    # prompt 3: one pair 0 > 1 with equal scores: d = 0, loss log 2, not "strictly higher".
    p3 = math.log(2.0)
    loss, aux = losses.rm_loss(rewards, ranks, valid)
    np.testing.assert_allclose(loss, (p0 + p1 + p3) / 3.0, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], 1.0 / 5.0, rtol=1e-6)
    assert int(aux["num_pairs"]) == 5 and int(aux["num_prompts"]) == 3


def _rm_reference(rewards, ranks, valid):
    """Pure-Python enumeration of all pairs."""
    per_prompt, correct, n_pairs = [], 0, 0
    for r, rk, v in zip(rewards.tolist(), ranks.tolist(), valid.tolist()):
        terms = []
        for i, j in itertools.permutations(range(len(r)), 2):
            if v[i] and v[j] and rk[i] < rk[j]:
                terms.append(softplus(-(r[i] - r[j])))
                correct += r[i] > r[j]
        n_pairs += len(terms)
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    loss = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
    acc = correct / n_pairs if n_pairs else 0.0
    return loss, acc, n_pairs, len(per_prompt)


@pytest.mark.parametrize("seed", range(5))
def test_rm_loss_brute_force(seed):
    rng = np.random.default_rng(seed)
    B, K = 6, 5
    rewards = rng.normal(size=(B, K)).astype(np.float32) * 2
    ranks = rng.integers(0, 3, size=(B, K))  # 3 rank levels among 5 completions: ties guaranteed
    n_valid = rng.integers(0, K + 1, size=B)  # ragged K, including prompts with 0 or 1 completion
    valid = (np.arange(K)[None] < n_valid[:, None]).astype(np.int32)
    valid = np.take_along_axis(valid, rng.permuted(np.tile(np.arange(K), (B, 1)), axis=1), axis=1)
    loss, aux = losses.rm_loss(rewards, ranks, valid)
    ref_loss, ref_acc, ref_pairs, ref_prompts = _rm_reference(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ref_acc, rtol=1e-6)
    assert int(aux["num_pairs"]) == ref_pairs and int(aux["num_prompts"]) == ref_prompts


def test_rm_loss_paper_normalisation_without_ties():
    # No ties, full K: per-prompt mean == 1/C(K,2) Σ over pairs (the paper's formula).
    rewards = np.array([[0.3, -1.2, 2.0, 0.7]])
    ranks = np.array([[2, 0, 3, 1]])
    total = sum(softplus(-(rewards[0, i] - rewards[0, j]))
                for i in range(4) for j in range(4) if ranks[0, i] < ranks[0, j])
    loss, _ = losses.rm_loss(rewards, ranks, np.ones((1, 4)))
    np.testing.assert_allclose(loss, total / math.comb(4, 2), rtol=1e-6)


def test_rm_loss_no_pairs_and_stability():
    rewards = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    ranks = np.array([[0, 0], [0, 1]])
    valid = np.array([[1, 1], [1, 0]])  # tie in prompt 0, one valid completion in prompt 1
    loss, aux = losses.rm_loss(rewards, ranks, valid)
    assert float(loss) == 0.0 and float(aux["accuracy"]) == 0.0 and int(aux["num_pairs"]) == 0
    g = jax.grad(lambda r: losses.rm_loss(r, ranks, valid)[0])(rewards)
    np.testing.assert_array_equal(g, np.zeros((2, 2)))
    # A badly wrong pair with a huge margin stays finite: -log σ(-200) ≈ 200.
    loss, _ = losses.rm_loss(np.array([[-100.0, 100.0]]), np.array([[0, 1]]), np.ones((1, 2)))
    np.testing.assert_allclose(loss, 200.0, rtol=1e-6)


def test_rm_loss_value_and_grad_under_outer_jit():
    # As in a train step: value_and_grad inside the caller's jit.
    rewards = np.array([[0.5, -0.5, 3.0]], np.float32)
    ranks, valid = np.array([[0, 1, 0]]), np.array([[1, 1, 0]])
    step = jax.jit(jax.value_and_grad(lambda r: losses.rm_loss(r, ranks, valid)[0]))
    loss, g = step(rewards)
    # one pair, d = r0 - r1 = 1: loss = softplus(-1); dloss/dr0 = -σ(-1) = -dloss/dr1; padding gets 0.
    s = 1.0 / (1.0 + math.e)
    np.testing.assert_allclose(loss, softplus(-1.0), rtol=1e-6)
    np.testing.assert_allclose(g, [[-s, s, 0.0]], rtol=1e-6)


# --- ppo_policy_loss -----------------------------------------------------------------------

def _ppo_case():
    ratios = np.array([1.5, 1.5, 0.5, 0.5, 1.1, 1.3, 1.0])
    adv = np.array([1.0, -1.0, 1.0, -1.0, 2.0, 0.0, 5.0])
    old = np.full(7, -2.0)
    logp = old + np.log(ratios)
    logp[6] = 1000.0  # masked token with a garbage log-prob: ratio would overflow
    mask = np.array([1, 1, 1, 1, 1, 1, 0])
    return logp[None], old[None], adv[None], mask[None]


def test_ppo_policy_loss_clipping_both_sides():
    logp, old, adv, mask = _ppo_case()
    loss, aux = losses.ppo_policy_loss(logp, old, adv, mask, 0.2)
    # ρ=1.5,A=+1: min(1.5, 1.2) = 1.2 (clipped)   ρ=1.5,A=-1: min(-1.5, -1.2) = -1.5
    # ρ=0.5,A=+1: min(0.5, 0.8) = 0.5             ρ=0.5,A=-1: min(-0.5, -0.8) = -0.8 (clipped)
    # ρ=1.1,A=2: 2.2 (inside the trust region)   ρ=1.3,A=0: 0 (outside, but A = 0: nothing to clip)
    np.testing.assert_allclose(loss, -(1.2 - 1.5 + 0.5 - 0.8 + 2.2 + 0.0) / 6, rtol=1e-5)
    # The clip binds (the clipped term is selected and differs) on tokens 0 and 3 only: 2 of 6.
    np.testing.assert_allclose(aux["clipfrac"], 2 / 6, rtol=1e-6)
    lr = np.log([1.5, 1.5, 0.5, 0.5, 1.1, 1.3])
    np.testing.assert_allclose(aux["approx_kl"], np.mean(0.5 * lr**2), rtol=1e-5)
    # d loss / d logp = -A·ρ/N where unclipped, 0 where the clip is active or masked.
    g = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, 0.2)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(g[0], [0.0, 1.5 / 6, -0.5 / 6, 0.0, -2.2 / 6, 0.0, 0.0], rtol=1e-5, atol=1e-7)


def test_ppo_policy_loss_on_policy_and_empty():
    adv = np.array([[1.0, -3.0, 0.5]])
    logp = np.array([[-1.0, -2.0, -3.0]])
    loss, aux = losses.ppo_policy_loss(logp, logp, adv, np.ones((1, 3)), 0.2)
    np.testing.assert_allclose(loss, 0.5, rtol=1e-6)  # ρ = 1: -mean(A)
    assert float(aux["clipfrac"]) == 0.0 and float(aux["approx_kl"]) == 0.0
    loss, aux = losses.ppo_policy_loss(logp, logp, adv, np.zeros((1, 3)), 0.2)
    assert float(loss) == 0.0 and not np.isnan(float(aux["clipfrac"]))


AGGS = losses.AGGREGATIONS


def _aggregate_reference(s, mask, agg, max_tokens=None):
    """Plain-Python loops over rows and tokens (float64): the definitions in each method's paper."""
    rows = [[x for x, m in zip(row, mrow) if m] for row, mrow in zip(s.tolist(), mask.tolist())]
    if agg == "token_mean":
        tokens = [x for r in rows for x in r]
        return sum(tokens) / len(tokens) if tokens else 0.0
    if agg == "seq_mean_token_sum_norm":  # every row counts, non-empty or not: a constant normaliser
        return sum(sum(r) for r in rows) / (len(rows) * max_tokens)
    per_seq = [(sum(r) / len(r) if agg == "seq_mean_token_mean" else sum(r)) for r in rows if r]
    return sum(per_seq) / len(per_seq) if per_seq else 0.0


def _ragged_case(seed, B=6, T=7):
    """Random per-token values with garbage in the padding, ragged masks (prefixes and a gap), an empty row."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[2] = 0  # a response with no valid token
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    mask[4, 0] = 0.0  # not only prefixes: a hole at the start of a row
    garbage = rng.choice([np.inf, -np.inf, np.nan, 1e30], size=(B, T))
    return rng, mask, garbage


def test_aggregate_hand():
    s = np.array([[1.0, 3.0, np.inf], [5.0, np.nan, 0.0], [np.inf, 2.0, 2.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # lengths 2, 1, 0
    want = {"token_mean": 9 / 3,                    # (1 + 3 + 5) / 3 tokens
            "seq_mean_token_mean": (2.0 + 5.0) / 2,  # token means 2 and 5; the empty row is not a response
            "seq_mean_token_sum": (4.0 + 5.0) / 2,   # token sums 4 and 5
            "seq_mean_token_sum_norm": 9 / (3 * 4)}  # Σ / (3 rows × max_tokens 4)
    for agg, value in want.items():
        np.testing.assert_allclose(losses.aggregate(s, mask, agg, 4), value, rtol=1e-6, err_msg=agg)
        assert float(losses.aggregate(s, np.zeros_like(mask), agg, 4)) == 0.0  # empty batch: 0, not NaN


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_aggregate_brute_force(agg, seed):
    rng, mask, garbage = _ragged_case(seed)
    s = rng.normal(size=mask.shape).astype(np.float32)
    got = losses.aggregate(np.where(mask > 0, s, garbage), mask, agg, 9)
    np.testing.assert_allclose(got, _aggregate_reference(s, mask, agg, 9), rtol=1e-5, atol=1e-7)


def test_aggregate_errors_list_the_choices():
    with pytest.raises(ValueError, match=", ".join(losses.AGGREGATIONS)):
        losses.aggregate(np.zeros((1, 2)), np.ones((1, 2)), "seq_sum")
    with pytest.raises(ValueError, match="max_tokens"):
        losses.aggregate(np.zeros((1, 2)), np.ones((1, 2)), "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        losses.ppo_policy_loss(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), np.ones((1, 2)), 0.2, agg="mean")
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        losses.kl_loss(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), agg="mean")


def _ppo_reference(logp, old, adv, mask, eps, agg, max_tokens):
    """Per token with math.exp, min and explicit clipping; clipfrac from the definition: the clipped
    term is selected and differs from the unclipped one."""
    s, binds, n = np.zeros(logp.shape), 0, 0
    for b, t in itertools.product(range(logp.shape[0]), range(logp.shape[1])):
        if not mask[b, t]:
            continue
        rho, a = math.exp(float(logp[b, t]) - float(old[b, t])), float(adv[b, t])
        unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
        s[b, t] = -min(unclipped, clipped)
        binds += clipped < unclipped
        n += 1
    return _aggregate_reference(s, mask, agg, max_tokens), (binds / n if n else 0.0)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("seed", range(3))
def test_ppo_policy_loss_every_agg_brute_force(agg, seed):
    rng, mask, garbage = _ragged_case(seed)
    old = rng.normal(size=mask.shape).astype(np.float32) - 2
    logp = (old + rng.normal(size=mask.shape) * 0.4).astype(np.float32)  # ρ from about 0.3 to 3: both clips bind
    adv = rng.normal(size=mask.shape).astype(np.float32)
    logp_in = np.where(mask > 0, logp, garbage).astype(np.float32)
    loss, aux = losses.ppo_policy_loss(logp_in, old, adv, mask, 0.2, agg=agg, max_tokens=9)
    want, clipfrac = _ppo_reference(logp, old, adv, mask, 0.2, agg, 9)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["clipfrac"], clipfrac, rtol=1e-6)
    assert 0 < clipfrac < 1
    g = jax.grad(lambda lp: losses.ppo_policy_loss(lp, old, adv, mask, 0.2, agg=agg, max_tokens=9)[0])(
        jnp.asarray(logp_in))
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[mask == 0] == 0).all()


def test_ppo_policy_loss_agg_hand():
    """Two responses, on-policy (ρ = 1, s = −A): lengths 3 and 1, advantages 1 and 4 on every token."""
    adv = np.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    mask = np.array([[1, 1, 1], [1, 0, 0]])
    logp = np.zeros((2, 3))
    want = {"token_mean": -(3 + 4) / 4, "seq_mean_token_mean": -(1 + 4) / 2, "seq_mean_token_sum": -(3 + 4) / 2,
            "seq_mean_token_sum_norm": -(3 + 4) / (2 * 5)}
    for agg, value in want.items():
        loss, _ = losses.ppo_policy_loss(logp, logp, adv, mask, 0.2, agg=agg, max_tokens=5)
        np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=agg)


# --- value_loss ----------------------------------------------------------------------------

def test_value_loss_clip():
    v = np.array([[0.5, 0.5, 0.1, -0.5, 7.0]])
    v_old = np.zeros((1, 5))
    ret = np.array([[1.0, 0.0, 1.0, -1.0, 0.0]])
    mask = np.array([[1, 1, 1, 1, 0]])
    loss, aux = losses.value_loss(v, v_old, ret, mask, 0.2)
    # per token max(unclipped, clipped): max(.25, (.2-1)²=.64)=.64*, max(.25, .04)=.25,
    # .81 (inside the clip range), max(.25, (-.2+1)²=.64)=.64*   (* = clip active)
    np.testing.assert_allclose(loss, 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4, rtol=1e-6)
    np.testing.assert_allclose(aux["vf_clipfrac"], 0.5, rtol=1e-6)
    g = jax.grad(lambda x: losses.value_loss(x, v_old, ret, mask, 0.2)[0])(jnp.asarray(v))
    # unclipped tokens: (v - R)/N; clipped ones and the masked one: 0.
    np.testing.assert_allclose(g[0], [0.0, 0.5 / 4, (0.1 - 1.0) / 4, 0.0, 0.0], rtol=1e-5, atol=1e-7)


# --- dpo_loss ------------------------------------------------------------------------------

BAD = np.inf  # what a padded slot may hold: it must never reach the loss, a metric or a gradient

# prompt 0: Δ = logp - ref = [0.5, -0.5, -1] strictly ranked; slot 3 is padding.
# prompt 1: Δ = [1, 0, -1] with completions 0 and 1 tied for best; slot 3 is padding.
DPO_LOGP = np.array([[-1.0, -2.0, -3.0, BAD], [-1.0, -2.0, -3.0, -BAD]], np.float32)
DPO_REF = np.array([[-1.5, -1.5, -2.0, BAD], [-2.0, -2.0, -2.0, 7.0]], np.float32)
DPO_RANKS = np.array([[0, 1, 2, 0], [0, 0, 1, 3]])
DPO_VALID = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
DPO_BETA = 0.5


def test_dpo_loss_hand():
    b = DPO_BETA
    # pairs (w, l) and Δ_w - Δ_l: prompt 0: (0,1) 1, (0,2) 1.5, (1,2) 0.5; prompt 1: (0,2) 2, (1,2) 1.
    d0, d1 = [1.0, 1.5, 0.5], [2.0, 1.0]
    sig = (np.mean([softplus(-b * d) for d in d0]) + np.mean([softplus(-b * d) for d in d1])) / 2
    ipo = (np.mean([(d - 1 / (2 * b)) ** 2 for d in d0]) + np.mean([(d - 1 / (2 * b)) ** 2 for d in d1])) / 2
    # Plackett–Luce on s = βΔ. Prompt 0: stages "0 first of {0,1,2}", "1 first of {1,2}".
    # Prompt 1 (Breslow): 0 and 1 each against the risk set {0,1,2}; 2 is the worst group: no stage.
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    pl0 = ((-0.25 + lse(0.25, -0.25, -0.5)) + (0.25 + lse(-0.25, -0.5))) / 2
    pl1 = ((-0.5 + lse(0.5, 0.0, -0.5)) + (0.0 + lse(0.5, 0.0, -0.5))) / 2
    expected = {"sigmoid": sig, "ipo": ipo, "plackett_luce": (pl0 + pl1) / 2}
    # Over the 5 pairs: βΔ_w = [.25, .25, -.25, .5, 0], βΔ_l = [-.25, -.5, -.5, -.5, -.5].
    chosen, rejected = 0.75 / 5, -2.25 / 5
    for loss_type, value in expected.items():
        loss, aux = losses.dpo_loss(DPO_LOGP, DPO_REF, DPO_RANKS, DPO_VALID, b, loss_type)
        assert loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=loss_type)
        np.testing.assert_allclose(aux["accuracy"], 1.0)
        assert int(aux["num_pairs"]) == 5 and int(aux["num_prompts"]) == 2
        np.testing.assert_allclose(aux["chosen_reward"], chosen, rtol=1e-6)
        np.testing.assert_allclose(aux["rejected_reward"], rejected, rtol=1e-6)
        np.testing.assert_allclose(aux["margin"], chosen - rejected, rtol=1e-6)


def _dpo_reference(logp, ref, ranks, valid, beta, loss_type, lengths=None, pl_normalize=True):
    """Plain-Python loops over prompts and pairs / Plackett–Luce stages (float64). lengths: IPO on per-token
    mean log-ratios (TRL's); pl_normalize=False: a prompt's stages summed (the DPO paper's listwise loss)."""
    per_prompt, correct, n_pairs, chosen, rejected = [], 0, 0, 0.0, 0.0
    lengths = np.ones_like(logp) if lengths is None else lengths
    for lp, rf, rk, v, n in zip(logp.tolist(), ref.tolist(), ranks.tolist(), valid.tolist(), lengths.tolist()):
        idx = [i for i in range(len(lp)) if v[i]]
        delta = {i: (lp[i] - rf[i]) / max(n[i], 1) for i in idx}
        pairs = [(i, j) for i in idx for j in idx if rk[i] < rk[j]]
        for i, j in pairs:
            correct += delta[i] > delta[j]
            chosen += beta * delta[i]
            rejected += beta * delta[j]
        n_pairs += len(pairs)
        if loss_type == "sigmoid":
            terms = [softplus(-beta * (delta[i] - delta[j])) for i, j in pairs]
        elif loss_type == "ipo":
            terms = [(delta[i] - delta[j] - 1 / (2 * beta)) ** 2 for i, j in pairs]
        else:
            worst = max((rk[i] for i in idx), default=None)
            terms = []
            for i in idx:
                if rk[i] == worst:
                    continue
                risk = [beta * delta[j] for j in idx if rk[j] >= rk[i]]
                terms.append(-beta * delta[i] + math.log(sum(math.exp(s) for s in risk)))
        if terms:
            per_prompt.append(sum(terms) / (len(terms) if pl_normalize else 1))
    loss = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
    metrics = (correct / n_pairs, chosen / n_pairs, rejected / n_pairs) if n_pairs else (0.0, 0.0, 0.0)
    return loss, n_pairs, len(per_prompt), metrics


def _dpo_random_case(seed, B=7, K=5):
    rng = np.random.default_rng(seed)
    logp = (rng.normal(size=(B, K)) * 3 - 20).astype(np.float32)
    ref = (logp + rng.normal(size=(B, K))).astype(np.float32)
    ranks = rng.integers(0, 3, size=(B, K))  # 3 rank levels among 5: ties guaranteed
    ranks[0] = 1  # a prompt where everything ties: no pair, no stage, excluded from the mean
    n_valid = np.array([K, 0, 1, *rng.integers(2, K + 1, size=B - 3)])  # ragged K, incl. 0 and 1
    valid = (np.arange(K)[None] < n_valid[:, None]).astype(np.int32)
    valid = np.take_along_axis(valid, rng.permuted(np.tile(np.arange(K), (B, 1)), axis=1), axis=1)
    garbage = rng.choice([np.inf, -np.inf, np.nan, 1e30], size=(B, K))
    logp = np.where(valid > 0, logp, garbage).astype(np.float32)
    ref = np.where(valid > 0, ref, garbage[:, ::-1]).astype(np.float32)
    return logp, ref, ranks, valid


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "plackett_luce"])
@pytest.mark.parametrize("seed", range(3))
def test_dpo_loss_brute_force(loss_type, seed):
    logp, ref, ranks, valid = _dpo_random_case(seed)
    beta = 0.3
    loss, aux = losses.dpo_loss(logp, ref, ranks, valid, beta, loss_type=loss_type)
    ref_loss, ref_pairs, ref_prompts, (acc, chosen, rejected) = _dpo_reference(logp, ref, ranks, valid, beta,
                                                                             loss_type)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    assert int(aux["num_pairs"]) == ref_pairs and int(aux["num_prompts"]) == ref_prompts
    np.testing.assert_allclose(aux["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(aux["chosen_reward"], chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["rejected_reward"], rejected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["margin"], chosen - rejected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(2))
def test_dpo_sigmoid_is_rm_loss_on_implicit_rewards(seed):
    logp, ref, ranks, valid = _dpo_random_case(seed)
    beta = 0.1
    loss, aux = losses.dpo_loss(logp, ref, ranks, valid, beta)
    implicit = beta * (np.where(valid > 0, logp, 0.0) - np.where(valid > 0, ref, 0.0))
    rm, rm_aux = losses.rm_loss(implicit, ranks, valid)
    np.testing.assert_allclose(loss, rm, rtol=1e-5)
    for key in ("accuracy", "num_pairs", "num_prompts"):
        np.testing.assert_allclose(aux[key], rm_aux[key])


def test_dpo_plackett_luce_with_two_completions_is_sigmoid():
    logp, ref = np.array([[-3.0, -5.0], [-2.0, -1.0]]), np.array([[-4.0, -4.5], [-2.5, -1.5]])
    ranks, valid = np.array([[0, 1], [1, 0]]), np.ones((2, 2))
    pl, _ = losses.dpo_loss(logp, ref, ranks, valid, 0.7, "plackett_luce")
    sig, _ = losses.dpo_loss(logp, ref, ranks, valid, 0.7, "sigmoid")
    np.testing.assert_allclose(pl, sig, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "plackett_luce"])
def test_dpo_loss_grad_finite_with_inf_padding_under_jit(loss_type):
    logp, ref, ranks, valid = _dpo_random_case(0)
    step = jax.jit(jax.value_and_grad(lambda lp, b: losses.dpo_loss(lp, ref, ranks, valid, b, loss_type)[0]))
    loss, g = step(jnp.asarray(logp), jnp.float32(0.3))  # traced β
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[valid == 0], 0.0)
    # Prompts without a pair (all tied, empty, a single completion) get no gradient at all.
    np.testing.assert_array_equal(np.asarray(g)[:3], 0.0)
    assert np.abs(np.asarray(g)[3:][valid[3:] > 0]).sum() > 0


@pytest.mark.parametrize("seed", range(3))
def test_dpo_ipo_token_mean_brute_force(seed):
    """ipo_token_mean=True: Δ_i / lengths_i (per-token mean log-ratios) in the loss and every metric."""
    logp, ref, ranks, valid = _dpo_random_case(seed)
    lengths = np.random.default_rng(100 + seed).integers(1, 40, size=logp.shape)
    lengths = np.where(valid > 0, lengths, 0)
    empty = np.flatnonzero(valid[3])[0]
    lengths[3, empty], ref[3, empty] = 0, logp[3, empty]  # a valid completion of no tokens: Δ = 0 / max(0, 1)
    loss, aux = losses.dpo_loss(logp, ref, ranks, valid, 0.3, "ipo", lengths=lengths, ipo_token_mean=True)
    ref_loss, _, _, (acc, chosen, rejected) = _dpo_reference(logp, ref, ranks, valid, 0.3, "ipo", lengths=lengths)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    np.testing.assert_allclose(aux["accuracy"], acc, rtol=1e-6)
    np.testing.assert_allclose(aux["chosen_reward"], chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["rejected_reward"], rejected, rtol=1e-5, atol=1e-6)
    summed, _ = losses.dpo_loss(logp, ref, ranks, valid, 0.3, "ipo", lengths=lengths)  # default: the IPO paper's
    np.testing.assert_allclose(summed, _dpo_reference(logp, ref, ranks, valid, 0.3, "ipo")[0], rtol=2e-5)
    assert abs(float(summed) - float(loss)) > 1e-3


def test_dpo_ipo_token_mean_hand():
    # One pair: Δ_w = 3 over 3 tokens, Δ_l = −2 over 4 tokens. β = 0.5: target margin 1/(2β) = 1.
    logp, ref = np.array([[-3.0, -6.0]]), np.array([[-6.0, -4.0]])
    ranks, valid, lengths = np.array([[0, 1]]), np.ones((1, 2)), np.array([[3, 4]])
    summed, _ = losses.dpo_loss(logp, ref, ranks, valid, 0.5, "ipo")
    mean, aux = losses.dpo_loss(logp, ref, ranks, valid, 0.5, "ipo", lengths=lengths, ipo_token_mean=True)
    np.testing.assert_allclose(summed, (5.0 - 1.0) ** 2, rtol=1e-6)   # (3 − (−2) − 1)²
    np.testing.assert_allclose(mean, (1.5 - 1.0) ** 2, rtol=1e-6)     # (1 − (−0.5) − 1)²
    np.testing.assert_allclose(aux["margin"], 0.5 * 1.5, rtol=1e-6)   # β(Δ_w/3 − Δ_l/4)


@pytest.mark.parametrize("seed", range(3))
def test_dpo_plackett_luce_sum_over_stages_brute_force(seed):
    logp, ref, ranks, valid = _dpo_random_case(seed)
    loss, aux = losses.dpo_loss(logp, ref, ranks, valid, 0.3, "plackett_luce", pl_normalize=False)
    ref_loss, _, ref_prompts, _ = _dpo_reference(logp, ref, ranks, valid, 0.3, "plackett_luce", pl_normalize=False)
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
    assert int(aux["num_prompts"]) == ref_prompts
    mean, _ = losses.dpo_loss(logp, ref, ranks, valid, 0.3, "plackett_luce")  # default: per-prompt mean
    assert float(mean) < float(loss)


def test_dpo_plackett_luce_sum_hand():
    # The hand case above: each prompt has 2 stages; summed instead of averaged per prompt.
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    pl0 = (-0.25 + lse(0.25, -0.25, -0.5)) + (0.25 + lse(-0.25, -0.5))
    pl1 = (-0.5 + lse(0.5, 0.0, -0.5)) + (0.0 + lse(0.5, 0.0, -0.5))
    loss, _ = losses.dpo_loss(DPO_LOGP, DPO_REF, DPO_RANKS, DPO_VALID, DPO_BETA, "plackett_luce", pl_normalize=False)
    np.testing.assert_allclose(loss, (pl0 + pl1) / 2, rtol=1e-6)


def test_dpo_options_that_do_not_apply_are_errors():
    args = (np.zeros((1, 2)), np.zeros((1, 2)), np.array([[0, 1]]), np.ones((1, 2)), 0.1)
    with pytest.raises(ValueError, match="ipo_token_mean"):
        losses.dpo_loss(*args, "sigmoid", lengths=np.ones((1, 2)), ipo_token_mean=True)
    with pytest.raises(ValueError, match="lengths"):
        losses.dpo_loss(*args, "ipo", ipo_token_mean=True)
    with pytest.raises(ValueError, match="pl_normalize"):
        losses.dpo_loss(*args, "ipo", pl_normalize=False)


def test_dpo_loss_no_pairs_and_bad_type():
    loss, aux = losses.dpo_loss(np.zeros((2, 2)), np.zeros((2, 2)), np.array([[0, 0], [0, 1]]),
                                np.array([[1, 1], [1, 0]]), 0.1, "plackett_luce")
    assert float(loss) == 0.0 and float(aux["margin"]) == 0.0 and int(aux["num_prompts"]) == 0
    with pytest.raises(ValueError, match="plackett_luce"):
        losses.dpo_loss(np.zeros((1, 2)), np.zeros((1, 2)), np.array([[0, 1]]), np.ones((1, 2)), 0.1, "kto")


# --- kl_loss -------------------------------------------------------------------------------

# Two valid tokens with r = π_ref/π = 1/2 and 2; the third is padding holding garbage.
KL_LOGP = np.array([[math.log(0.5), math.log(0.25), np.inf]], np.float32)
KL_REF = np.array([[math.log(0.25), math.log(0.5), -np.inf]], np.float32)
KL_MASK = np.array([[1, 1, 0]])
LOG2 = math.log(2.0)


@pytest.mark.parametrize("estimator, value, grad", [
    # k1 = [log 2, -log 2]; d/dlogp = 1 per token.
    ("k1", 0.0, [0.5, 0.5, 0.0]),
    # k2 = ½(log r)² = ½ log²2 twice; d/dlogp = logp - ref = [log 2, -log 2].
    ("k2", 0.5 * LOG2**2, [LOG2 / 2, -LOG2 / 2, 0.0]),
    # k3 = (r-1) - log r = [-0.5 + log 2, 1 - log 2], sum 0.5; d/dlogp = 1 - r = [0.5, -1].
    ("k3", 0.25, [0.25, -0.5, 0.0]),
])
def test_kl_loss_hand(estimator, value, grad):
    loss, aux = losses.kl_loss(KL_LOGP, KL_REF, KL_MASK, estimator)
    np.testing.assert_allclose(loss, value, rtol=1e-6, atol=1e-7)
    assert float(aux["num_tokens"]) == 2.0 and abs(float(aux["k1"])) < 1e-7
    g_logp, g_ref = jax.grad(lambda lp, rf: losses.kl_loss(lp, rf, KL_MASK, estimator)[0], argnums=(0, 1))(
        jnp.asarray(KL_LOGP), jnp.asarray(KL_REF))
    np.testing.assert_allclose(g_logp[0], grad, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(g_ref, 0.0)  # the reference is a constant


def test_kl_loss_default_empty_and_bad_estimator():
    loss, _ = losses.kl_loss(KL_LOGP, KL_REF, KL_MASK)
    np.testing.assert_allclose(loss, 0.25, rtol=1e-6)  # k3 by default
    loss, aux = losses.kl_loss(KL_LOGP, KL_REF, np.zeros_like(KL_MASK))
    assert float(loss) == 0.0 and float(aux["k1"]) == 0.0
    with pytest.raises(ValueError, match="k2"):
        losses.kl_loss(KL_LOGP, KL_REF, KL_MASK, "k4")


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_loss_every_agg_brute_force(agg, estimator):
    rng, mask, garbage = _ragged_case(7)
    logp = rng.normal(size=mask.shape).astype(np.float32) - 2
    ref = (logp + rng.normal(size=mask.shape) * 0.5).astype(np.float32)
    per_token = np.zeros(mask.shape)
    for b, t in zip(*np.nonzero(mask)):  # log r = ref − logp; k2 = ½ log² r, k3 = r − 1 − log r
        log_r = float(ref[b, t]) - float(logp[b, t])
        per_token[b, t] = 0.5 * log_r ** 2 if estimator == "k2" else math.exp(log_r) - 1 - log_r
    loss, aux = losses.kl_loss(np.where(mask > 0, logp, garbage), np.where(mask > 0, ref, garbage[::-1]), mask,
                               estimator, agg=agg, max_tokens=9)
    np.testing.assert_allclose(loss, _aggregate_reference(per_token, mask, agg, 9), rtol=1e-5, atol=1e-7)
    assert float(aux["num_tokens"]) == mask.sum()


# Exact on-policy expectations on one categorical distribution over V tokens (no sampling):
# E_{y~π}[∇θ kl_loss(log πθ(y), log π_ref(y))] = Σ_y π(y) ∇θ (per-sample loss of token y).
V = 6
REF_LOGITS = np.random.default_rng(11).normal(size=V).astype(np.float32)
NOISE = np.random.default_rng(12).normal(size=V).astype(np.float32)


def _kl_exact(theta, forward=True):
    lp, ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
    p, q = (lp, ref) if forward else (ref, lp)
    return jnp.sum(jnp.exp(p) * (p - q))


@functools.lru_cache(maxsize=None)
def _expected_kl_loss_grad_fn(estimator):
    def per_sample(theta, y):
        lp = jax.nn.log_softmax(theta)[y]
        ref = jax.nn.log_softmax(REF_LOGITS)[y]
        return losses.kl_loss(lp[None, None], ref[None, None], jnp.ones((1, 1)), estimator)[0]

    @jax.jit
    def expected(theta):
        grads = jax.vmap(jax.grad(per_sample), in_axes=(None, 0))(theta, jnp.arange(V))  # [V, V]
        return jax.nn.softmax(theta) @ grads

    return expected


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_kl_loss_expected_gradients(scale):
    theta = jnp.asarray(REF_LOGITS + scale * NOISE)
    forward = jax.grad(_kl_exact)(theta)                                # ∇KL(π ‖ π_ref)
    reverse = jax.grad(functools.partial(_kl_exact, forward=False))(theta)  # ∇KL(π_ref ‖ π)
    # k2 as a loss term: exactly ∇KL(π ‖ π_ref).
    np.testing.assert_allclose(_expected_kl_loss_grad_fn("k2")(theta), forward, rtol=2e-3, atol=1e-7)
    # k3 as a loss term: exactly ∇KL(π_ref ‖ π), the reverse KL ...
    k3 = _expected_kl_loss_grad_fn("k3")(theta)
    np.testing.assert_allclose(k3, reverse, rtol=2e-3, atol=1e-7)
    # ... which matches ∇KL(π ‖ π_ref) to first order near the reference, not far from it.
    assert (_rel_err(k3, forward) < 0.05) if scale < 0.1 else (_rel_err(k3, forward) > 0.2)
    # k1 as a loss term: E_π[∇ log π] = 0, no signal at all.
    np.testing.assert_allclose(_expected_kl_loss_grad_fn("k1")(theta), 0.0, atol=1e-6)
