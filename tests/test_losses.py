"""Tests for instructgpt_jax.losses: hand-computed cases and brute-force references."""
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
    # No ties, full K: per-prompt mean == 1/C(K,2) Σ over pairs (DESIGN §1 formula).
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
    # ρ=1.1,A=2: 2.2 (inside the trust region)   ρ=1.3,A=0: 0 (outside, counts for clipfrac only)
    np.testing.assert_allclose(loss, -(1.2 - 1.5 + 0.5 - 0.8 + 2.2 + 0.0) / 6, rtol=1e-5)
    np.testing.assert_allclose(aux["clipfrac"], 5 / 6, rtol=1e-6)
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
