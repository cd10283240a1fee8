"""The RL stage: PPO / PPO-ptx smoke run and resume, GRPO / verifier smoke runs, and every option that
changes results (scoring of truncated responses, no-EOS penalty, KL in the reward or as a loss, first
ratio 1 in f32 and bf16, lr schedule in updates, debiased EMA, rollout chunks, bad combinations)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import BUILTIN, ppo_interrupted_then_resumed, stage_config

from instructgpt_jax import checkpoints, config_lib, losses, plan, ppo, sampling, scoring, sharding, train_lib
from instructgpt_jax.data import iterators as pipeline
from instructgpt_jax.data.tokenizer import load_tokenizer
from instructgpt_jax.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, sft_workdir, rm_workdir):
    workdir = str(tmp_path_factory.mktemp("ppo"))
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "ppo.ptx_coef": 1.0})
    ppo.train(config, workdir, builtin_data=BUILTIN)
    return config, workdir


def test_ppo_smoke(ppo_run):
    config, workdir = ppo_run
    records = train_lib.read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("score", "kl", "beta", "entropy", "pg_loss", "value_loss", "clipfrac", "approx_kl",
                "explained_variance", "ptx_loss", "response_length", "eos_rate", "rollout_tokens_per_sec",
                "update_tokens_per_sec", "eval_score", "eval_kl", "lr"):
        assert np.isfinite(records[-1][key]), key
    # iteration 1 samples from the SFT policy itself: KL to the reference is exactly 0
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert checkpoints.read_export_meta(workdir)["ptx_coef"] == 1.0
    assert checkpoints.read_export_meta(f"{workdir}/export_ema")["ema_decay"] == 0.992


@pytest.fixture(scope="module")
def models(ppo_run, sft_workdir, rm_workdir):
    """Policy = reference = SFT, the RM (also the value model), the tokenizer and a few prompts."""
    config, _ = ppo_run
    mesh = sharding.make_mesh(config.mesh)
    policy = Transformer(ModelConfig.from_config(config.model))
    sft_params = checkpoints.load_params(sft_workdir, policy, mesh)
    rm = scoring.RewardModel.load(rm_workdir, mesh)
    tok = load_tokenizer(f"{sft_workdir}/export")
    texts = ("Q: reverse: cat dog\nA:", "Q: add: 3 + 4\nA:", "Q: sort: b a c\nA:", "Q: upper: dog\nA:")
    rows = [pipeline.prompt_example({"prompt": t}, tok, max_prompt_len=24)["pieces"][0] for t in texts]
    prompts = {k: np.stack([r[k] for r in rows]) for k in ("prompt_tokens", "prompt_mask")}
    return dict(config=config, mesh=mesh, policy=policy, sft=sft_params, rm=rm, tok=tok, prompts=prompts,
                texts=texts)


def _rollout(m, max_new_tokens=8, params=None, model=None):
    """One sampled batch and its forward pass (old / reference log-probs, values, RM scores)."""
    model = model or m["policy"]
    params = params or m["sft"]
    sampler = sampling.make_sampler(model, max_new_tokens=max_new_tokens, eos_id=m["tok"].eos_ids,
                                    pad_id=m["tok"].pad_id)
    sample = sampler(params, m["prompts"]["prompt_tokens"], m["prompts"]["prompt_mask"], jax.random.PRNGKey(0))
    sample["prompt_mask"] = jnp.asarray(m["prompts"]["prompt_mask"])
    fwd = jax.jit(functools.partial(ppo.rollout_forward, policy=model, value_model=m["rm"].model,
                                    rm_model=m["rm"].model, eos_id=m["tok"].eos_id, temperature=1.0,
                                    rm_bias=m["rm"].bias))
    out = fwd({"policy": params, "reference": params, "value": m["rm"].params, "rm": m["rm"].params}, sample)
    return sample, out


def test_policy_equal_reference_has_zero_kl_and_old_logprobs_match_the_sampler(models):
    sample, out = _rollout(models)
    mask = np.asarray(sample["response_mask"])
    np.testing.assert_array_equal(np.asarray(out["old_logp"]) * mask, np.asarray(out["ref_logp"]) * mask)
    np.testing.assert_allclose(np.asarray(out["old_logp"]) * mask, np.asarray(sample["logprobs"]) * mask, atol=1e-4)


def test_rm_scores_a_rollout_exactly_as_it_was_trained(models):
    """Responses with and without a sampled EOS (cut at max_new_tokens) score what the RM gives the row it was
    trained on: BOS + prompt + response ids + EOS (appended when none was sampled), right-padded."""
    m = models
    sample, out = _rollout(m, max_new_tokens=4)
    ended, lengths = np.asarray(sample["ended"]), np.asarray(sample["lengths"])
    assert (~ended).any(), "need a truncated response"
    rows, n = [], []
    for i in range(4):
        prompt = np.asarray(m["prompts"]["prompt_tokens"][i])[np.asarray(m["prompts"]["prompt_mask"][i]) > 0]
        response = list(np.asarray(sample["response"][i])[:lengths[i]])
        seq = list(prompt) + response + ([] if ended[i] else [m["tok"].eos_id])
        rows.append(np.pad(np.asarray(seq, np.int32), (0, 40 - len(seq))))
        n.append(len(seq))
    tokens, n = np.stack(rows), np.asarray(n)
    seg = (np.arange(40)[None] < n[:, None]).astype(np.int32)
    want = m["rm"](tokens, seg, np.where(seg > 0, np.arange(40)[None], 0), n - 1)
    np.testing.assert_allclose(np.asarray(out["scores"]), np.asarray(want), atol=1e-5)


def test_append_eos_hand_example():
    tokens = jnp.array([[0, 5, 6, 7, 3, 0], [9, 9, 6, 7, 8, 4]])  # P = 2, N = 4; row 0 ended (EOS 3)
    prompt_mask = jnp.array([[0, 1], [1, 1]])
    response_mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    t, pos, seg, last = scoring.append_eos(tokens, prompt_mask, response_mask, jnp.array([True, False]), 3)
    np.testing.assert_array_equal(t, [[0, 5, 6, 7, 3, 0, 0], [9, 9, 6, 7, 8, 4, 3]])
    np.testing.assert_array_equal(last, [4, 6])
    np.testing.assert_array_equal(seg, [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(pos[:, :5], [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])


def test_no_eos_penalty_is_subtracted_from_truncated_responses_only(models):
    cfg = models["config"].ppo.copy_and_resolve_references()
    mask = jnp.ones((4, 3))
    zeros = jnp.zeros((4, 3))
    scores, ended = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([True, False, True, False])
    for penalize, want in ((False, [1.0, 2.0, 3.0, 4.0]), (True, [1.0, 0.5, 3.0, 2.5])):
        cfg.penalize_no_eos, cfg.no_eos_penalty = penalize, 1.5
        cfg.advantage_estimator, cfg.group_size = "dr_grpo", 2
        _, _, met = ppo.advantages(scores, zeros, zeros, None, mask, ended, 0.0, cfg=cfg)
        assert float(met["score"]) == pytest.approx(np.mean(want))
    cfg.advantage_estimator = "grpo"
    adv, _, _ = ppo.advantages(scores, zeros, zeros, None, mask, ended, 0.0, cfg=cfg)
    # groups (1.0, 0.5) and (3.0, 2.5): r - mean over std(ddof 1) + 1e-4, on every token
    g = 0.25 / (np.std([1.0, 0.5], ddof=1) + 1e-4)
    np.testing.assert_allclose(adv[:, 0], [g, -g, g, -g], rtol=1e-5)
    np.testing.assert_array_equal(adv[:, 0], adv[:, 2])


def test_kl_in_the_reward_or_as_a_loss_term(models):
    """kl_penalty='reward': beta * sum k1 comes off each sequence's reward; 'loss': the reward is the score."""
    cfg = models["config"].ppo.copy_and_resolve_references()
    cfg.advantage_estimator, cfg.group_size = "rloo", 2
    logp, ref = jnp.array([[-1.0, -2.0], [-1.0, -1.0]]), jnp.array([[-1.5, -1.0], [-1.0, -1.0]])
    mask, scores, ended = jnp.ones((2, 2)), jnp.array([1.0, 1.0]), jnp.array([True, True])
    cfg.kl_penalty = "reward"
    adv, _, met = ppo.advantages(scores, logp, ref, None, mask, ended, 0.5, cfg=cfg)
    # k1 sums: row 0 = 0.5 - 1.0 = -0.5, row 1 = 0 -> rewards 1.25 and 1.0; rloo: 1.25 - 1.0 = 0.25
    np.testing.assert_allclose(adv[:, 0], [0.25, -0.25], rtol=1e-6)
    assert float(met["kl"]) == pytest.approx(-0.25)
    cfg.kl_penalty = "loss"
    adv, _, _ = ppo.advantages(scores, logp, ref, None, mask, ended, 0.5, cfg=cfg)
    np.testing.assert_allclose(adv, 0.0)


def _update(m, sample, out, ptx, ptx_coef, dtype="float32"):
    config = m["config"]
    cfg = config.ppo.copy_and_resolve_references()
    cfg.ptx_coef = ptx_coef
    policy_tx = train_lib.make_optimizer(config.optim, 10)
    value_tx = train_lib.make_optimizer(config.value_optim, 10)
    state = ppo.init_state(m["sft"], policy_tx, 0.02, m["rm"].params, value_tx)
    p = sample["prompt_mask"].shape[1]
    adv, returns, _ = ppo.advantages(out["scores"], out["old_logp"], out["ref_logp"], out["values"],
                                     sample["response_mask"], sample["ended"], 0.02, cfg=cfg)
    rows = scoring.sequence_inputs(sample["tokens"], sample["prompt_mask"], sample["response_mask"])
    batch = dict(zip(("tokens", "positions", "segments"), rows), mask=sample["response_mask"],
                 old_logp=out["old_logp"], ref_logp=out["ref_logp"], advantages=adv, old_values=out["values"],
                 returns=returns)
    policy = Transformer(ModelConfig.from_config({**config.model.to_dict(), "dtype": dtype}))
    fn = jax.jit(functools.partial(ppo.update_step, policy=policy, value_model=m["rm"].model,
                                   policy_tx=policy_tx, value_tx=value_tx, cfg=cfg, prompt_len=p))
    new_state, metrics = fn(state, batch, jnp.arange(4), ptx)
    return new_state["policy"]["params"], metrics


def _ptx_batch(seed):
    t = np.random.default_rng(seed).integers(4, 400, (2, 16)).astype(np.int32)
    return {"tokens": t, "targets": np.roll(t, -1, 1), "loss_mask": np.ones((2, 16), np.float32),
            "segment_ids": np.ones((2, 16), np.int32), "positions": np.tile(np.arange(16), (2, 1))}


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_ptx_coef_changes_the_policy_gradient_and_zero_removes_it(models):
    sample, out = _rollout(models)
    plain, met0 = _update(models, sample, out, _ptx_batch(0), 0.0)
    plain_other, _ = _update(models, sample, out, _ptx_batch(1), 0.0)
    with_ptx, met1 = _update(models, sample, out, _ptx_batch(0), 1.0)
    leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    np.testing.assert_array_equal(leaves(plain), leaves(plain_other))  # gamma 0: the ptx batch is ignored
    assert np.abs(leaves(plain) - leaves(with_ptx)).max() > 1e-6
    assert "ptx_loss" in met1 and "ptx_loss" not in met0


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_first_minibatch_ratio_is_one(models, dtype):
    """Old log-probs (rollout forward on chunks of the minibatch's shape) and the update's log-probs come from
    the same computation: the first minibatch's ratio is 1 up to rounding, in float32 and bfloat16 alike
    (measured: approx_kl < 1e-12 in float32, ~2e-6 in bfloat16, i.e. |log ratio| ~ 2e-3, below bfloat16's
    resolution; whole-batch forwards gave 5e-5)."""
    m = models
    model = Transformer(ModelConfig.from_config({**m["config"].model.to_dict(), "dtype": dtype}))
    sample, out = _rollout(m, model=model)
    _, met = _update(m, sample, out, _ptx_batch(0), 0.0, dtype=dtype)
    assert float(met["clipfrac"]) == 0.0
    assert float(met["approx_kl"]) < (1e-10 if dtype == "float32" else 1e-5), float(met["approx_kl"])


def test_lr_schedule_counts_updates_and_warmup_counts_iterations():
    """10-iteration warmup at 4 updates per iteration: the peak is reached at update 40, not 10."""
    optim = config_lib.optim_config(1e-3, warmup_steps=10)
    optim.warmup_init_frac, optim.end_lr_frac = 0.1, 0.1
    sched = train_lib.lr_schedule(optim, num_steps=30, updates_per_step=4)
    assert float(sched(0)) == pytest.approx(1e-4)
    assert float(sched(20)) == pytest.approx(1e-4 + 0.5 * 9e-4)  # iteration 5 of 10
    assert float(sched(40)) == pytest.approx(1e-3)
    assert float(sched(120)) == pytest.approx(1e-4, rel=1e-3)  # decayed to 10 % at the last iteration


# ----------------------------------------------------------------------------- update_step on a random tiny policy
# No trained stage needed: the update's losses, their aggregation and the EMA only need some policy and some
# ragged rollout.

B, P, N = 4, 6, 5  # rows, prompt tokens, response tokens
LENGTHS = np.array([5, 1, 3, 2])  # ragged responses: every aggregation gives a different loss


@pytest.fixture(scope="module")
def tiny():
    config = stage_config("grpo", **{"ppo.reward": "verifier", "ppo.verifier": "instructgpt_jax.miniature.world:verify",
                                     "ppo.max_new_tokens": N, "ppo.ema_decay": 0.9})
    policy = Transformer(ModelConfig.from_config(config.model))
    init = lambda r: policy.init(r, jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
    _, shardings = sharding.param_shardings(init, sharding.make_mesh(config.mesh))  # as the stage places them
    params = jax.device_put(init(jax.random.PRNGKey(0)), shardings)
    rng = np.random.default_rng(0)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[::2, :2] = 0  # left padding
    mask = (np.arange(N)[None] < LENGTHS[:, None]).astype(np.float32)
    tokens = (rng.integers(4, 500, (B, P + N)) * np.concatenate([prompt_mask, mask], 1)).astype(np.int32)
    rows = scoring.sequence_inputs(jnp.asarray(tokens), jnp.asarray(prompt_mask), jnp.asarray(mask))
    logp = np.asarray(scoring.response_logprobs(params, policy, *rows, P)[0])
    batch = dict(zip(("tokens", "positions", "segments"), rows), mask=mask,
                 # ρ ≠ 1, so that clips bind
                 old_logp=((logp + rng.normal(size=logp.shape) * 0.3) * mask).astype(np.float32),
                 ref_logp=((logp + rng.normal(size=logp.shape) * 0.5) * mask).astype(np.float32),
                 advantages=(rng.normal(size=(B, 1)) * mask).astype(np.float32))
    return dict(config=config, policy=policy, params=params, batch=batch, logp=logp)


def _tiny_update(t, **ppo_overrides):
    """ppo.update_step, jitted as the stage jits it (critic-free: no value model), and its initial state."""
    cfg = config_lib.replace(t["config"], **{f"ppo.{k}": v for k, v in ppo_overrides.items()}).ppo
    tx = train_lib.make_optimizer(config_lib.optim_config(1e-2), 10)  # large steps: the policies differ clearly
    state = ppo.init_state(t["params"], tx, cfg.kl_coef)
    step = jax.jit(functools.partial(ppo.update_step, policy=t["policy"], value_model=None, policy_tx=tx,
                                     value_tx=None, cfg=cfg, prompt_len=P))
    return cfg, state, lambda s: step(s, t["batch"], jnp.arange(B), {"tokens": jnp.zeros((1, 1), jnp.int32)})


def test_ptx_microbatches_give_the_whole_batch_mean_and_gradient(tiny):
    """PPO-ptx over micro-batches of pretraining rows (rows with different token counts): the ptx loss is the
    token mean over all rows, by hand, and the policy's gradient (an SGD step of 1) is the same for every micro-batch
    size, and not the gradient of γ = 0."""
    rng = np.random.default_rng(3)
    t = rng.integers(4, 500, (6, 10)).astype(np.int32)
    mask = (np.arange(10)[None] < np.array([10, 2, 7, 1, 5, 9])[:, None]).astype(np.float32)
    ptx = {"tokens": t, "targets": np.roll(t, -1, 1), "loss_mask": mask, "segment_ids": np.ones_like(t),
           "positions": np.tile(np.arange(10, dtype=np.int32), (6, 1))}
    hidden = tiny["policy"].apply({"params": tiny["params"]}, t, ptx["positions"], ptx["segment_ids"], return_hidden=True)
    logp = np.asarray(scoring.token_stats(tiny["params"], tiny["policy"], hidden, ptx["targets"])["logp"])
    by_hand = -(logp * mask).sum() / mask.sum()
    leaves = lambda tr: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tr)])  # noqa: E731
    updated = {}
    for micro, coef in ((6, 1.0), (2, 1.0), (6, 0.0)):
        cfg = config_lib.replace(tiny["config"], **{"ppo.ptx_coef": coef, "ppo.ptx_batch_size": 6,
                                                    "ppo.ptx_microbatch": micro}).ppo
        tx = optax.sgd(1.0)
        step = jax.jit(functools.partial(ppo.update_step, policy=tiny["policy"], value_model=None, policy_tx=tx,
                                         value_tx=None, cfg=cfg, prompt_len=P))
        state, met = step(ppo.init_state(tiny["params"], tx, cfg.kl_coef), tiny["batch"], jnp.arange(B), ptx)
        updated[micro, coef] = leaves(state["policy"]["params"])
        if coef:
            np.testing.assert_allclose(met["ptx_loss"], by_hand, rtol=1e-5)
            np.testing.assert_allclose(updated[micro, coef], updated[6, 1.0], rtol=1e-5, atol=1e-6)
    assert np.abs(updated[6, 0.0] - updated[6, 1.0]).max() > 1e-2


@pytest.mark.parametrize("lora_rank", [0, 16])
def test_ptx_microbatch_is_chosen_by_the_memory_plan(lora_rank):
    """ppo.ptx_microbatch 0: minibatch-sized micro-batches where the activations they save outweigh the float32
    gradient accumulator they add (by hand from the plan's own estimates), else the whole batch; an explicit value
    wins; plain PPO has none. SmolLM2-135M with 32 rows of 128 tokens at remat full: the whole batch at full
    fine-tuning (the model is larger), micro-batches with LoRA."""
    config = config_lib.load("ppo", "tiny")
    config.model = config_lib.model_config("smollm2-135m")
    config = config_lib.replace(config, **{"ppo.ptx_coef": 1.0, "model.remat": "full", "lora.rank": lora_rank,
                                           "ppo.ptx_batch_size": 32, "data.ptx_seq_len": 128})
    assert config.ppo.ptx_microbatch == 0 and config.ppo.minibatch_size == 8
    cfg, mesh = ModelConfig.from_config(config.model), plan.abstract_mesh((1, 1, 1))
    saved = plan.activations(cfg, 32, 128, mesh) - plan.activations(cfg, 8, 128, mesh)
    trainable = (plan.lora_shards(cfg, "lm", mesh, 16).adapters if lora_rank else plan.param_shards(cfg, "lm", mesh)[1])
    assert (saved > 4 * trainable) == bool(lora_rank)
    assert plan.ptx_microbatch(config, (1, 1, 1)) == (8 if lora_rank else 32)
    assert plan.ptx_microbatch(config_lib.replace(config, **{"ppo.ptx_batch_size": 20}), (1, 1, 1)) == (
        5 if lora_rank else 20)  # the largest divisor of 20 within the minibatch
    assert plan.ptx_microbatch(config_lib.replace(config, **{"ppo.ptx_microbatch": 16}), (1, 1, 1)) == 16
    assert plan.ptx_microbatch(config_lib.replace(config, **{"ppo.ptx_coef": 0.0}), (1, 1, 1)) == 32


def test_each_estimator_defaults_to_its_papers_loss_aggregation():
    cfg = config_lib.load("grpo", "tiny").ppo
    papers = {"gae": "token_mean",                                # PPO: every token of the batch weighs the same
              "grpo": "seq_mean_token_mean",                      # Shao et al. 2024 eq. 3: 1/G Σ_i 1/|o_i| Σ_t
              "dr_grpo": "seq_mean_token_sum_norm",               # Liu et al. 2025: Σ_i Σ_t / (G · max tokens)
              "rloo": "seq_mean_token_sum"}                       # Ahmadian et al. 2024: REINFORCE on log π(y)
    assert set(papers) == set(ppo.ADVANTAGE_ESTIMATORS)
    for estimator, agg in papers.items():
        cfg.advantage_estimator, cfg.loss_agg = estimator, ""
        assert ppo.loss_aggregation(cfg) == (agg, cfg.max_new_tokens if estimator == "dr_grpo" else None)
        cfg.loss_agg = "token_mean"  # an explicit choice wins
        assert ppo.loss_aggregation(cfg) == ("token_mean", None)
    assert config_lib.load("ppo", "tiny").ppo.loss_agg == "" and cfg.loss_agg in losses.AGGREGATIONS


@pytest.mark.parametrize("estimator, agg, max_tokens", [
    ("gae", "token_mean", None), ("grpo", "seq_mean_token_mean", None),
    ("dr_grpo", "seq_mean_token_sum_norm", N), ("rloo", "seq_mean_token_sum", None)])
def test_update_step_aggregates_policy_and_kl_losses_as_the_paper(tiny, estimator, agg, max_tokens):
    """The update's policy loss and KL loss term are those of the estimator's aggregation (at the params
    before the step), and differ from token_mean wherever the paper's differs."""
    b = tiny["batch"]
    _, state, update = _tiny_update(tiny, advantage_estimator=estimator)
    _, met = update(state)
    pg, aux = losses.ppo_policy_loss(tiny["logp"], b["old_logp"], b["advantages"], b["mask"], 0.2, agg=agg,
                                     max_tokens=max_tokens)
    kl, _ = losses.kl_loss(tiny["logp"], b["ref_logp"], b["mask"], "k3", agg=agg, max_tokens=max_tokens)
    np.testing.assert_allclose(met["pg_loss"], pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(met["kl_loss"], kl, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(met["clipfrac"], aux["clipfrac"], atol=1e-6)
    if agg != "token_mean":
        pg_tok, _ = losses.ppo_policy_loss(tiny["logp"], b["old_logp"], b["advantages"], b["mask"], 0.2)
        kl_tok, _ = losses.kl_loss(tiny["logp"], b["ref_logp"], b["mask"], "k3")
        assert abs(float(pg_tok) - float(pg)) > 1e-3 and abs(float(kl_tok) - float(kl)) > 1e-3


def test_ema_is_bias_corrected_through_update_step(tiny):
    """The stage's own update and `ema_params`: before any update the EMA export is the policy itself (not
    zeros); after two it is (d·p1 + p2) / (1 + d), the bias-corrected average of the updated policies, with
    no weight left on the starting (SFT) policy."""
    cfg, state, update = _tiny_update(tiny)
    d = cfg.ema_decay
    leaves = lambda t: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(t)])  # noqa: E731
    p0 = leaves(state["policy"]["params"])
    np.testing.assert_array_equal(leaves(ppo.ema_params(state, d)), p0)
    np.testing.assert_array_equal(leaves(jax.jit(functools.partial(ppo.ema_params, decay=d))(state)), p0)
    state1, _ = update(state)
    np.testing.assert_allclose(leaves(ppo.ema_params(state1, d)), leaves(state1["policy"]["params"]), rtol=1e-5,
                               atol=1e-7)
    state2, _ = update(state1)
    p1, p2 = leaves(state1["policy"]["params"]), leaves(state2["policy"]["params"])
    assert int(state2["updates"]) == 2 and np.abs(p2 - p1).max() > 1e-3 and np.abs(p1 - p0).max() > 1e-3
    np.testing.assert_allclose(leaves(ppo.ema_params(state2, d)), (d * p1 + p2) / (1 + d), rtol=1e-5, atol=1e-6)


def test_sampling_in_chunks_with_row_ids_equals_one_call(models):
    """config.ppo.rollout_chunk changes memory, not samples: each row draws from its own key."""
    m = models
    sampler = sampling.make_sampler(m["policy"], max_new_tokens=6, eos_id=m["tok"].eos_ids, pad_id=m["tok"].pad_id)
    tok, mask, rng = m["prompts"]["prompt_tokens"], m["prompts"]["prompt_mask"], jax.random.PRNGKey(3)
    whole = sampler(m["sft"], tok, mask, rng, jnp.arange(4))
    parts = [sampler(m["sft"], tok[c:c + 2], mask[c:c + 2], rng, jnp.arange(c, c + 2)) for c in (0, 2)]
    np.testing.assert_array_equal(np.concatenate([x["tokens"] for x in parts]), whole["tokens"])


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_grpo_with_a_verifier_reward_runs_critic_free(tmp_path, sft_workdir):
    """configs/grpo.py with the miniature's verifier and RLOO: no value model, no RM, the KL as a k3 loss."""
    config = stage_config("grpo", **{"init.from_workdir": sft_workdir, "ppo.reward": "verifier",
                                     "ppo.verifier": "instructgpt_jax.miniature.world:verify",
                                     "ppo.advantage_estimator": "rloo", "ppo.group_size": 2,
                                     "train.num_steps": 1, "train.eval_batches": 1})
    ppo.train(config, str(tmp_path), builtin_data=BUILTIN)
    rec = train_lib.read_metrics(str(tmp_path))[-1]
    assert "value_loss" not in rec and "explained_variance" not in rec
    assert np.isfinite(rec["kl_loss"]) and 0.0 <= rec["score"] <= 1.0 and np.isfinite(rec["eval_score"])
    meta = checkpoints.read_export_meta(str(tmp_path))
    assert meta["advantage_estimator"] == "rloo" and meta["reward"] == "verifier"


class _Traced(Exception):
    pass


def test_reward_and_value_models_compute_as_the_run_says(tmp_path, sft_workdir, rm_workdir, monkeypatch):
    """The RM export was trained with remat 'none' and float32; the run's remat, dtype and chunking apply to the
    reward model and the value model on its trunk too (the memory a PPO run plans for), not the export's."""
    assert checkpoints.read_export_meta(rm_workdir)["model"]["remat"] == "none"
    seen = {}

    def spy(*args, policy, value_model, rm_model, **kwargs):
        seen.update(policy=policy.cfg, value=value_model.cfg, rm=rm_model.cfg)
        raise _Traced
    monkeypatch.setattr(ppo, "rollout_forward", spy)
    keys = {"model.remat": "full", "model.dtype": "bfloat16", "model.logits_chunk": 64, "model.scan_unroll": 2}
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir, **keys})
    with pytest.raises(_Traced):
        ppo.train(config, str(tmp_path), builtin_data=BUILTIN)
    for name in ("policy", "value", "rm"):
        assert [getattr(seen[name], k.split(".")[1]) for k in keys] == list(keys.values()), name


def test_bad_rl_options_are_refused():
    base = stage_config("ppo", **{"ppo.rm_workdir": "x"})
    for overrides, match in (({"ppo.advantage_estimator": "ppo2"}, "valid: gae, grpo"),
                             ({"ppo.kl_estimator": "k3"}, "only k1"),
                             ({"ppo.kl_penalty": "loss", "ppo.kl_estimator": "k1"}, "valid k2, k3"),
                             ({"ppo.advantage_estimator": "grpo"}, "group_size >= 2"),
                             ({"ppo.advantage_estimator": "grpo", "ppo.group_size": 3}, "not a multiple of 3"),
                             ({"ppo.reward": "verifier"}, "config.ppo.verifier"),
                             ({"ppo.loss_agg": "seq_mean"}, "valid: '' .*token_mean, seq_mean_token_mean"),
                             ({"train.grad_accum": 2}, "does not accumulate"),
                             ({"ppo.ptx_coef": 1.0, "ppo.ptx_batch_size": 6, "ppo.ptx_microbatch": 4}, "must divide")):
        with pytest.raises(ValueError, match=match):
            ppo.check_config(config_lib.replace(base, **overrides))


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_ppo_resume_continues_exactly(tmp_path, ppo_run, monkeypatch):
    """Interrupted after iteration 1 (checkpointed), rerun: iteration 2 equals the uninterrupted run's
    (both optimizers, EMA, KL controller, data positions and RNG come back)."""
    config, straight_dir = ppo_run
    config = config.copy_and_resolve_references()
    config.train.checkpoint_every = 1
    workdir = str(tmp_path / "ppo")
    ppo_interrupted_then_resumed(config, workdir, monkeypatch)
    resumed, straight = train_lib.read_metrics(workdir), train_lib.read_metrics(straight_dir)
    assert [r["step"] for r in resumed] == [1, 2]
    for key in ("score", "kl", "pg_loss", "value_loss", "ptx_loss", "beta", "eval_score"):
        assert resumed[1][key] == pytest.approx(straight[1][key], rel=1e-5, abs=1e-6), key
