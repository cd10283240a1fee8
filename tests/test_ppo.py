"""PPO / PPO-ptx stage: a two-iteration smoke run, the first ratio is 1, ptx changes the gradient."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import stage_config

from instructgpt_jax import checkpoints, ppo, sampling, sharding, train_lib
from instructgpt_jax.data import iterators as pipeline
from instructgpt_jax.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, sft_workdir, rm_workdir):
    workdir = str(tmp_path_factory.mktemp("ppo"))
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "ppo.ptx_coef": 1.0})
    ppo.train(config, workdir)
    return config, workdir


def test_ppo_smoke(ppo_run):
    config, workdir = ppo_run
    records = train_lib.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("score", "kl", "beta", "entropy", "pg_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "ptx_loss", "response_length", "eos_rate", "rollout_tokens_per_sec",
                "update_tokens_per_sec", "eval_score", "eval_kl"):
        assert np.isfinite(records[-1][key]), key
    # iteration 1 samples from the SFT policy itself: KL to the reference is exactly 0
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert checkpoints.read_export_meta(workdir)["ptx_coef"] == 1.0
    assert checkpoints.read_export_meta(f"{workdir}/export_ema")["ema_decay"] == 0.992


@pytest.fixture(scope="module")
def rollout(ppo_run, sft_workdir, rm_workdir):
    """One rollout batch from the SFT policy, and everything needed to update on it."""
    config, _ = ppo_run
    mesh = sharding.make_mesh(config.mesh)
    m = ppo.load_models(config, mesh)
    tok = Tokenizer.load(f"{sft_workdir}/export/tokenizer.model")
    rows = [pipeline.prompt_example({"prompt": t}, tok, max_prompt_len=24)["pieces"][0]
            for t in ("Q: reverse: cat dog\nA:", "Q: add: 3 + 4\nA:")]
    prompts = np.stack([r["prompt_tokens"] for r in rows])
    prompt_mask = np.stack([r["prompt_mask"] for r in rows])
    sampler = sampling.make_sampler(m["policy"], max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id)
    sample = sampler(m["sft_params"], prompts, prompt_mask, jax.random.PRNGKey(0))
    sample["prompt_mask"] = jnp.asarray(prompt_mask)
    stats = jax.jit(functools.partial(ppo.rollout_stats, policy=m["policy"], value_model=m["rm_model"],
                                      rm_model=m["rm_model"], rm_bias=m["rm_bias"], cfg=config.ppo))
    batch, metrics = stats(m["sft_params"], m["sft_params"], m["rm_params"], m["rm_params"], sample, 0.02)
    return config, m, batch, metrics


def test_first_ratio_is_one_and_policy_equal_reference_has_zero_kl(rollout):
    config, m, batch, metrics = rollout
    p = batch["tokens"].shape[1] - batch["mask"].shape[1]
    logp, _ = jax.jit(ppo.response_logprobs, static_argnums=(1, 5))(
        m["sft_params"], m["policy"], batch["tokens"], batch["positions"], batch["segments"], p)
    np.testing.assert_allclose(np.asarray(logp) * batch["mask"], batch["old_logp"] * batch["mask"], atol=1e-5)
    assert float(metrics["kl"]) == 0.0


def _update(config, m, batch, ptx, ptx_coef):
    cfg = config.ppo.copy_and_resolve_references()
    cfg.ptx_coef = ptx_coef
    policy_tx = train_lib.make_optimizer(config.optim, 10)
    value_tx = train_lib.make_optimizer(config.value_optim, 10)
    state = ppo.init_state(m, policy_tx, value_tx, config)
    fn = jax.jit(functools.partial(ppo.update_step, policy=m["policy"], value_model=m["rm_model"],
                                   policy_tx=policy_tx, value_tx=value_tx, cfg=cfg,
                                   prompt_len=batch["tokens"].shape[1] - batch["mask"].shape[1]))
    new_state, metrics = fn(state, batch, jnp.arange(2), ptx, jax.random.PRNGKey(0))
    return new_state["policy"]["params"], metrics


def test_ptx_coef_changes_the_policy_gradient_and_zero_removes_it(rollout):
    config, m, batch, _ = rollout
    def ptx_batch(seed):
        t = np.random.default_rng(seed).integers(4, 400, (2, 16)).astype(np.int32)
        return {"tokens": t, "targets": np.roll(t, -1, 1), "loss_mask": np.ones((2, 16), np.float32),
                "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1))}
    plain, met0 = _update(config, m, batch, ptx_batch(0), 0.0)
    plain_other, _ = _update(config, m, batch, ptx_batch(1), 0.0)
    with_ptx, met1 = _update(config, m, batch, ptx_batch(0), 1.0)
    leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    np.testing.assert_array_equal(leaves(plain), leaves(plain_other))  # gamma 0: the ptx batch is ignored
    assert np.abs(leaves(plain) - leaves(with_ptx)).max() > 1e-6
    assert "ptx_loss" in met1 and "ptx_loss" not in met0
    assert met0["approx_kl"] == pytest.approx(0.0, abs=1e-8) and met0["clipfrac"] == 0.0  # first ratio is 1


class _Interrupt(Exception):
    pass


def test_ppo_resume_continues_exactly(tmp_path, ppo_run, monkeypatch):
    """Interrupted after iteration 1 (checkpointed), rerun: iteration 2 equals the uninterrupted run's
    (both optimizers, EMA, KL controller, data positions and RNG come back)."""
    from instructgpt_jax.data import prepare
    config, straight_dir = ppo_run
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every = 1
    workdir = str(tmp_path / "ppo")
    original = prepare.prepare_ppo

    def interrupted(*args, **kwargs):
        data = original(*args, **kwargs)
        prompts, calls = data.prompts, [0]

        class Wrapped:
            def __next__(self):
                calls[0] += 1
                if calls[0] > 1:
                    raise _Interrupt
                return next(prompts)
            get_state, set_state = prompts.get_state, prompts.set_state
        data.prompts = Wrapped()
        return data

    monkeypatch.setattr(prepare, "prepare_ppo", interrupted)
    with pytest.raises(_Interrupt):
        ppo.train(config, workdir)
    monkeypatch.setattr(prepare, "prepare_ppo", original)
    ppo.train(config, workdir)
    resumed, straight = train_lib.read_metrics(workdir), train_lib.read_metrics(straight_dir)
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("score", "kl", "pg_loss", "value_loss", "ptx_loss", "beta", "eval_score"):
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-5, abs=1e-6), key
