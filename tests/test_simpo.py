"""SimPO: `losses.simpo_loss` against a loop over pairs and a hand-computed case; the stage trains from the SFT
export on the built-in K-wise comparisons and exports a policy that moved away from SFT."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BUILTIN

from instructgpt_jax import checkpoints, config_lib, losses, sharding, simpo, train_lib
from instructgpt_jax.models import ModelConfig, Transformer

BAD = np.inf  # what a padded slot may hold: it must never reach the loss, a metric or a gradient


def _reference(logp, lengths, ranks, valid, beta, gamma):
    """simpo_loss written as a loop over prompts and pairs."""
    per_prompt, pairs = [], []  # pairs: (r_w, r_l)
    for b in range(logp.shape[0]):
        idx = [i for i in range(logp.shape[1]) if valid[b, i]]
        r = {i: beta * logp[b, i] / lengths[b, i] for i in idx}
        mine = [(r[w], r[l]) for w in idx for l in idx if ranks[b, w] < ranks[b, l]]
        if mine:
            per_prompt.append(np.mean([math.log1p(math.exp(-(rw - rl - gamma))) for rw, rl in mine]))
        pairs += mine
    if not pairs:
        return 0.0, 0, 0, (0.0, 0.0, 0.0)
    acc = np.mean([rw > rl for rw, rl in pairs])
    return (float(np.mean(per_prompt)), len(pairs), len(per_prompt),
            (acc, np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])))


def _random_case(seed, b=6, k=5):
    """Ties (ranks in 0..2), ragged K (garbage in padded slots), one prompt whose completions all tie."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=(b, k)).astype(np.float32)
    logp = (-rng.uniform(0.2, 3.0, size=(b, k)) * lengths).astype(np.float32)
    ranks = rng.integers(0, 3, size=(b, k))
    valid = (np.arange(k)[None] < rng.integers(1, k + 1, size=(b, 1))).astype(np.int32)
    valid[0, :3] = 1
    ranks[0] = 1  # prompt 0: no untied pair
    logp[valid == 0], lengths[valid == 0] = BAD, 0.0
    return logp, lengths, ranks, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0), (0.5, 1.6)])
def test_simpo_loss_brute_force(seed, beta, gamma):
    logp, lengths, ranks, valid = _random_case(seed)
    loss, aux = losses.simpo_loss(logp, lengths, ranks, valid, beta, gamma)
    ref_loss, n_pairs, n_prompts, (acc, chosen, rejected) = _reference(logp, lengths, ranks, valid, beta, gamma)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert int(aux["num_pairs"]) == n_pairs and int(aux["num_prompts"]) == n_prompts < logp.shape[0]
    np.testing.assert_allclose([aux["accuracy"], aux["chosen_reward"], aux["rejected_reward"], aux["margin"]],
                               [acc, chosen, rejected, chosen - rejected], rtol=1e-5, atol=1e-6)


def test_simpo_loss_hand():
    # β 2, γ 1. Prompt 0: rewards 2·(-2/2) = -2, 2·(-6/3) = -4, 2·(-3/1) = -6; ranks 0, 1, 1 -> pairs (0,1)
    # margin 2 and (0,2) margin 4 ((1,2) is a tie). Prompt 1: rewards -2, 2·(-1/4) = -0.5, a padded slot;
    # pair (0,1) margin -1.5 (the dispreferred scores higher). Prompt 2: all tied, no pair.
    logp = np.array([[-2.0, -6.0, -3.0], [-1.0, -1.0, BAD], [-1.0, -2.0, -3.0]])
    lengths = np.array([[2, 3, 1], [1, 4, 0], [1, 1, 1]])
    ranks = np.array([[0, 1, 1], [0, 1, 0], [0, 0, 0]])
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    loss, aux = losses.simpo_loss(logp, lengths, ranks, valid, 2.0, 1.0)
    prompt0 = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-3.0))) / 2  # -log σ(2 - 1), -log σ(4 - 1)
    prompt1 = math.log1p(math.exp(2.5))                                       # -log σ(-1.5 - 1)
    np.testing.assert_allclose(loss, (prompt0 + prompt1) / 2, rtol=1e-6)
    assert int(aux["num_pairs"]) == 3 and int(aux["num_prompts"]) == 2
    np.testing.assert_allclose(aux["accuracy"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(aux["chosen_reward"], -2.0, rtol=1e-6)
    np.testing.assert_allclose(aux["rejected_reward"], (-4 - 6 - 0.5) / 3, rtol=1e-6)
    np.testing.assert_allclose(aux["margin"], -2.0 + 10.5 / 3, rtol=1e-6)


def test_simpo_loss_gamma_zero_is_rm_loss_on_average_logprobs_and_grads_skip_padding():
    logp, lengths, ranks, valid = _random_case(3)
    rewards = np.where(valid > 0, 2.0 * logp / np.where(valid > 0, lengths, 1.0), 0.0)
    np.testing.assert_allclose(losses.simpo_loss(logp, lengths, ranks, valid, 2.0, 0.0)[0],
                               losses.rm_loss(rewards, ranks, valid)[0], rtol=1e-6)
    step = jax.jit(jax.value_and_grad(lambda lp, b, g: losses.simpo_loss(lp, lengths, ranks, valid, b, g)[0]))
    loss, g = step(jnp.asarray(logp), jnp.float32(2.0), jnp.float32(1.0))  # traced β, γ
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[valid == 0], 0.0)
    loss, aux = losses.simpo_loss(np.zeros((2, 2)), np.ones((2, 2)), [[0, 0], [0, 1]], [[1, 1], [1, 0]], 2.0, 1.0)
    assert float(loss) == 0.0 and float(aux["margin"]) == 0.0 and int(aux["num_prompts"]) == 0


def _tiny(**overrides):
    """configs/simpo.py:tiny with the small overrides the DPO stage test uses."""
    return config_lib.load("simpo", "tiny", **{
        "data.train": "builtin", "data.seq_len": 48, "data.max_prompt_len": 24, "train.batch_size": 8,
        "train.num_steps": 6, "train.log_every": 5, "train.eval_every": 0, "train.eval_batches": 0,
        "train.progress": False, "data.builtin_size": 400, **overrides})


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_simpo_trains_from_sft(tmp_path, sft_workdir):
    simpo.train(_tiny(**{"init.from_workdir": sft_workdir}), str(tmp_path), builtin_data=BUILTIN)
    records = [r for r in train_lib.read_metrics(str(tmp_path)) if "loss" in r]
    assert records and all(np.isfinite(r["loss"]) for r in records)
    assert {"accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(records[-1])
    meta = checkpoints.read_export_meta(str(tmp_path))
    assert meta["stage"] == "simpo" and (meta["beta"], meta["gamma"]) == (2.0, 1.0)
    assert meta["model"] == checkpoints.read_export_meta(sft_workdir)["model"]
    model, mesh = Transformer(ModelConfig.from_config(meta["model"])), sharding.default_mesh()
    trained = checkpoints.load_params(str(tmp_path), model, mesh)
    sft = checkpoints.load_params(sft_workdir, model, mesh)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), trained, sft)
    assert max(jax.tree.leaves(moved)) > 0  # the policy moved away from the SFT weights


def test_simpo_needs_the_sft_export(tmp_path):
    with pytest.raises(ValueError, match="init.from_workdir"):
        simpo.train(_tiny(), str(tmp_path), builtin_data=BUILTIN)
