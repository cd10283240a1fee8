"""Tests for instructgpt_jax.rl: hand-computed cases and brute-force references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import losses, rl

# --- per-token KL / KL-shaped rewards ---------------------------------------------------------


def test_per_token_kl_hand():
    logp, ref = np.log([[0.5]]), np.log([[0.25]])
    np.testing.assert_allclose(rl.per_token_kl(logp, ref, "k1"), [[math.log(2.0)]], rtol=1e-6)
    # log r = log(π_ref/π) = -log 2: k2 = ½ log² 2; k3 = (r - 1) - log r = -0.5 + log 2
    np.testing.assert_allclose(rl.per_token_kl(logp, ref, "k2"), [[0.5 * math.log(2.0) ** 2]], rtol=1e-6)
    np.testing.assert_allclose(rl.per_token_kl(logp, ref, "k3"), [[-0.5 + math.log(2.0)]], rtol=1e-6)
    assert rl.KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1"):
        rl.per_token_kl(logp, ref, "k4")


SCORES = np.array([10.0, -1.0, 5.0])
LOGP = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
REF = np.array([[-1.5, -2.0, -2.0], [-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0]])
MASK = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])


def test_kl_penalized_rewards_hand():
    out = rl.kl_penalized_rewards(SCORES, LOGP, REF, MASK, 0.1)
    # row 0: kl = [0.5, 0, (masked)] -> [-0.05, 0 + 10, 0]
    # row 1: kl = [1, 1, 1]          -> [-0.1, -0.1, -0.1 - 1]
    # row 2: no valid token          -> nothing, not even the score
    np.testing.assert_allclose(out, [[-0.05, 10.0, 0.0], [-0.1, -0.1, -1.1], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_kl_penalized_rewards_jit_traced_beta_and_k1_only():
    out = jax.jit(rl.kl_penalized_rewards)(SCORES, LOGP, REF, MASK, jnp.float32(0.1))
    np.testing.assert_allclose(out, [[-0.05, 10.0, 0.0], [-0.1, -0.1, -1.1], [0.0, 0.0, 0.0]], rtol=1e-6)
    # The reward is always k1: there is no estimator option any more (k3 there cancels its own gradient).
    with pytest.raises(TypeError):
        rl.kl_penalized_rewards(SCORES, LOGP, REF, MASK, 0.1, kl_estimator="k3")


def test_policy_equal_to_reference_gives_zero_penalty():
    out = rl.kl_penalized_rewards(SCORES, LOGP, LOGP, MASK, 0.02)
    np.testing.assert_allclose(out, [[0.0, 10.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.0, 0.0]], atol=1e-7)


# Why the reward must be k1: on one categorical distribution over V tokens, the exact expected
# PPO / REINFORCE gradient (rewards as constants, enumerating every token, no sampling) of the
# per-token KL penalty, against the exact gradients of KL(π ‖ π_ref) and KL(π_ref ‖ π).
V = 6
REF_LOGITS = np.random.default_rng(21).normal(size=V).astype(np.float32)
NOISE = np.random.default_rng(22).normal(size=V).astype(np.float32)
BETA = 0.5


def _kl_exact(theta, forward=True):
    lp, ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
    p, q = (lp, ref) if forward else (ref, lp)
    return jnp.sum(jnp.exp(p) * (p - q))


@functools.lru_cache(maxsize=None)
def _expected_ppo_grad_fn(reward_estimator):
    """θ -> Σ_y π(y) ∇θ ppo_policy_loss of the one-token episode y, whose reward is the KL penalty
    computed at rollout time (a constant): kl_penalized_rewards (k1), or −β·k3 as the old option did."""
    def per_sample(theta, y):
        lp = jax.nn.log_softmax(theta)[y][None, None]
        old = jax.lax.stop_gradient(lp)  # the rollout policy: ρ = 1, the score-function gradient
        ref = jax.nn.log_softmax(REF_LOGITS)[y][None, None]
        one = jnp.ones((1, 1))
        if reward_estimator == "k1":
            reward = rl.kl_penalized_rewards(jnp.zeros(1), old, ref, one, BETA)
        else:
            reward = -BETA * rl.per_token_kl(old, ref, reward_estimator)
        return losses.ppo_policy_loss(lp, old, reward, one, 0.2)[0]

    @jax.jit
    def expected(theta):
        grads = jax.vmap(jax.grad(per_sample), in_axes=(None, 0))(theta, jnp.arange(V))  # [V, V]
        return jax.nn.softmax(theta) @ grads

    return expected


def _rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("scale", [0.01, 1.0])
def test_k1_reward_gives_the_kl_gradient_and_k3_reward_does_not(scale):
    theta = jnp.asarray(REF_LOGITS + scale * NOISE)
    forward = jax.grad(_kl_exact)(theta)
    reverse = jax.grad(functools.partial(_kl_exact, forward=False))(theta)
    # Minimising the PPO loss with k1 rewards follows exactly β·∇KL(π ‖ π_ref).
    np.testing.assert_allclose(_expected_ppo_grad_fn("k1")(theta), BETA * forward, rtol=2e-3, atol=1e-7)
    # With k3 in the reward it follows β·(∇KL(π ‖ π_ref) − ∇KL(π_ref ‖ π)) ...
    k3 = _expected_ppo_grad_fn("k3")(theta)
    np.testing.assert_allclose(k3, BETA * (forward - reverse), rtol=2e-3, atol=1e-6)
    # ... which is nearly nothing near the reference: the penalty silently vanishes.
    err = _rel_err(k3, BETA * forward)
    assert err > 0.9 if scale < 0.1 else err > 0.3, err


# --- GAE -------------------------------------------------------------------------------------


def _gae_reference(rewards, values, mask, gamma, lam):
    """Per-row Python loop over the valid prefix; values past its end count as 0."""
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n, last = int(mask[b].sum()), 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            last = rewards[b, t] + gamma * next_v - values[b, t] + gamma * lam * last
            adv[b, t], ret[b, t] = last, last + values[b, t]
    return adv, ret


def test_gae_hand():
    rewards = np.array([[0.0, 0.0, 1.0], [1.0, 2.0, 99.0]])
    values = np.array([[0.5, 0.5, 0.5], [1.0, 1.0, 99.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    # row 0, γ=λ=1: A_t = (sum of future rewards) - V_t = 1 - 0.5 everywhere; R_t = 1.
    # row 1, λ=0.5: δ_1 = 2 + 0 - 1 = 1 (V after the end is 0, the 99s are padding), A_1 = 1;
    #               δ_0 = 1 + 1 - 1 = 1, A_0 = 1 + 0.5·1 = 1.5; R = A + V.
    adv0, ret0 = rl.gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    np.testing.assert_allclose(adv0, [[0.5, 0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(ret0, [[1.0, 1.0, 1.0]], rtol=1e-6)
    adv1, ret1 = rl.gae(rewards[1:], values[1:], mask[1:], 1.0, 0.5)
    np.testing.assert_allclose(adv1, [[1.5, 1.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(ret1, [[2.5, 2.0, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_gae_matches_python_loop(seed):
    rng = np.random.default_rng(seed)
    B, T = 5, 7
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    lengths = np.array([0, 1, T, *rng.integers(0, T + 1, size=B - 3)])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    adv, ret = rl.gae(rewards, values, mask, 0.99, 0.95)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)


def test_gae_jit_traced_gamma_lam():
    rng = np.random.default_rng(7)
    rewards, values = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv, ret = jax.jit(rl.gae)(rewards, values, mask, 1.0, 0.9)
    ref_adv, ref_ret = _gae_reference(rewards, values, mask, 1.0, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)


# --- whiten / explained variance ------------------------------------------------------------


def test_whiten_hand_and_numpy():
    # [1, 3] -> mean 2, population var 1 -> [-1, 1]; the masked 100 is ignored and zeroed.
    out = rl.whiten(np.array([[1.0, 3.0, 100.0]]), np.array([[1, 1, 0]]))
    np.testing.assert_allclose(out, [[-1.0, 1.0, 0.0]], rtol=1e-6)
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 6))
    mask = rng.random((4, 6)) < 0.7
    v = x[mask]
    expected = np.where(mask, (x - v.mean()) / np.sqrt(v.var() + 1e-8), 0.0)
    np.testing.assert_allclose(rl.whiten(x, mask), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rl.whiten(x, mask, shift_mean=False), np.where(mask, expected + v.mean(), 0.0),
                               rtol=1e-5, atol=1e-6)
    assert not np.isnan(np.asarray(rl.whiten(x, np.zeros_like(mask)))).any()


def test_explained_variance_hand():
    ret = np.array([[1.0, 2.0, 3.0, 50.0]])
    mask = np.array([[1, 1, 1, 0]])
    np.testing.assert_allclose(rl.explained_variance(ret, ret, mask), 1.0)
    np.testing.assert_allclose(rl.explained_variance(np.full((1, 4), 2.0), ret, mask), 0.0, atol=1e-6)
    # residuals [0, 0, 1]: var 2/9; var(returns) = 2/3 -> 1 - 1/3
    values = np.array([[1.0, 2.0, 2.0, 0.0]])
    np.testing.assert_allclose(rl.explained_variance(values, ret, mask), 2 / 3, rtol=1e-6)
    assert float(rl.explained_variance(ret, np.ones((1, 4)), mask)) == 0.0  # constant returns: 0, not NaN


# --- KL controllers ------------------------------------------------------------------------


def test_kl_controllers_hand():
    beta = rl.kl_controller_init(0.1)
    assert beta.dtype == jnp.float32 and beta.shape == ()
    # KL far below target: error -0.5 clipped to -0.2; β·(1 - 0.2·512/10000)
    np.testing.assert_allclose(rl.adaptive_kl_update(beta, 3.0, 512, 6.0, 10000), 0.1 * (1 - 0.2 * 0.0512),
                               rtol=1e-6)
    # KL 10 % above target: error 0.1, unclipped
    np.testing.assert_allclose(rl.adaptive_kl_update(beta, 6.6, 512, 6.0, 10000), 0.1 * (1 + 0.1 * 0.0512),
                               rtol=1e-6)
    # far above: clipped to +0.2
    np.testing.assert_allclose(rl.kl_update(beta, 60.0, 512, target=6.0, horizon=10000),
                               0.1 * (1 + 0.2 * 0.0512), rtol=1e-6)
    np.testing.assert_allclose(rl.fixed_kl_update(beta, 60.0, 512), 0.1, rtol=1e-7)
    np.testing.assert_allclose(rl.kl_update(beta, 60.0, 512, target=None), 0.1, rtol=1e-7)


# --- group advantages ----------------------------------------------------------------------


def test_group_advantages_hand():
    scores = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two groups of 3
    # group 0: mean 2, unbiased std 1; group 1: constant -> all 0 (no NaN).
    np.testing.assert_allclose(rl.group_advantages(scores, 3), [-1 / 1.0001, 0, 1 / 1.0001, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(rl.group_advantages(scores, 3, "dr_grpo"), [-1, 0, 1, 0, 0, 0], atol=1e-6)
    # RLOO: 1 - mean(2, 3) = -1.5; 2 - 2 = 0; 3 - 1.5 = 1.5.
    np.testing.assert_allclose(rl.group_advantages(scores, 3, "rloo"), [-1.5, 0, 1.5, 0, 0, 0], atol=1e-6)
    # Groups of 2: [1, 2] -> std √½ ; [3, 5] -> std √2.
    out = rl.group_advantages(scores[:4], 2)
    np.testing.assert_allclose(out, [-0.5 / (0.5**0.5 + 1e-4), 0.5 / (0.5**0.5 + 1e-4),
                                     -1 / (2**0.5 + 1e-4), 1 / (2**0.5 + 1e-4)], rtol=1e-6)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_numpy_per_group(group_size):
    rng = np.random.default_rng(group_size)
    scores = rng.normal(size=16) * 3 + 1
    out = {k: np.asarray(rl.group_advantages(scores, group_size, k)) for k in rl.GROUP_ADVANTAGE_KINDS}
    for start in range(0, 16, group_size):
        g = scores[start:start + group_size]
        sl = slice(start, start + group_size)
        np.testing.assert_allclose(out["grpo"][sl], (g - g.mean()) / (g.std(ddof=1) + 1e-4), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["dr_grpo"][sl], g - g.mean(), rtol=1e-5, atol=1e-6)
        others = np.array([np.delete(g, i).mean() for i in range(group_size)])
        np.testing.assert_allclose(out["rloo"][sl], g - others, rtol=1e-5, atol=1e-6)


def test_group_advantages_errors_and_jit():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        rl.group_advantages(np.zeros(6), 4)
    for kind in ("grpo", "rloo"):
        with pytest.raises(ValueError, match=">= 2"):
            rl.group_advantages(np.zeros(4), 1, kind)
    np.testing.assert_allclose(rl.group_advantages(np.array([1.0, 3.0]), 1, "dr_grpo"), [0.0, 0.0])
    with pytest.raises(ValueError, match="dr_grpo"):
        rl.group_advantages(np.zeros(4), 2, "ppo")
    # Static options under the caller's jit.
    f = jax.jit(functools.partial(rl.group_advantages, group_size=2, kind="rloo"))
    np.testing.assert_allclose(f(jnp.array([0.0, 1.0, 4.0, 2.0])), [-1.0, 1.0, 2.0, -2.0], atol=1e-6)
