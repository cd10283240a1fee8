"""The LM head over chunks of positions (`model.logits_chunk`, `scoring.token_stats`): the same log-probs,
entropies, greedy flags, reference log-probs and KL as the whole [B, N, V] logits, the same gradients through
the SFT, DPO and PPO-ptx losses, and no full-size logits in the compiled step."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import config_lib, dpo, losses, plan, scoring, sharding, sft
from instructgpt_jax.models import ModelConfig, Transformer, lm_head_logits


def model_and_params(seed=0, **kw):
    cfg = dataclasses.replace(ModelConfig.from_config(config_lib.model_config("tiny")), **kw)
    model = Transformer(cfg)
    return model, sharding.init_model(model, jax.random.PRNGKey(seed), sharding.default_mesh())


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False, "final_softcap": 3.0}, {"dtype": "bfloat16"}])
def test_lm_head_logits_equal_the_module(kw):
    model, params = model_and_params(**kw)
    t = jnp.arange(30).reshape(3, 10) % 97
    assert jnp.array_equal(model.apply({"params": params}, t),
                           lm_head_logits(params, model.cfg, model.apply({"params": params}, t, return_hidden=True)))


@pytest.mark.parametrize("chunk", [1, 3, 7, 11])
def test_token_stats_in_chunks_equal_the_whole_logits(chunk):
    model, params = model_and_params()
    _, ref_params = model_and_params(seed=1)
    chunked = Transformer(dataclasses.replace(model.cfg, logits_chunk=chunk))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 500, (2, 11)), jnp.int32)
    targets = jnp.asarray(rng.integers(0, 500, (2, 11)), jnp.int32)
    hidden = model.apply({"params": params}, tokens, return_hidden=True)
    ref_hidden = model.apply({"params": ref_params}, tokens, return_hidden=True)
    # brute force from the module's own logits
    logits = model.apply({"params": params}, tokens) / 0.7
    ref_logits = model.apply({"params": ref_params}, tokens) / 0.7
    lp, ref_lp = jax.nn.log_softmax(logits), jax.nn.log_softmax(ref_logits)
    want = {"logp": losses.token_logprobs(logits, targets), "entropy": -(jnp.exp(lp) * lp).sum(-1),
            "correct": jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] == logits.max(-1),
            "ref_logp": losses.token_logprobs(ref_logits, targets), "kl": (jnp.exp(lp) * (lp - ref_lp)).sum(-1)}
    got = scoring.token_stats(params, chunked, hidden, targets, temperature=0.7, entropy=True, correct=True,
                              reference=(ref_params, ref_hidden))
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == (2, 11)
        np.testing.assert_allclose(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32), atol=2e-6,
                                   err_msg=k)


def _grads(loss_fn, params):
    return jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(params)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6, rtol=1e-5)


def test_sft_dpo_and_ptx_gradients_equal_unchunked():
    model, params = model_and_params()
    _, reference = model_and_params(seed=1)
    chunked = Transformer(dataclasses.replace(model.cfg, logits_chunk=5))
    rng = np.random.default_rng(0)
    b, t = 3, 17
    tokens = rng.integers(4, 500, (b, t)).astype(np.int32)
    batch = {"tokens": tokens, "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
             "segment_ids": np.ones((b, t), np.int32), "targets": np.roll(tokens, -1, 1),
             "loss_mask": (rng.random((b, t)) < 0.6).astype(np.float32)}
    _close(_grads(lambda p: sft.loss_fn(p, batch, None, model=model), params),
           _grads(lambda p: sft.loss_fn(p, batch, None, model=chunked), params))
    # DPO on K = 3 completions per prompt; its exact KL metric too
    k = 3
    last = np.array([[9, 14, 6], [16, 12, 8]])
    seg = (np.arange(t) <= last[..., None]).astype(np.int32)
    pairs = {"tokens": rng.integers(4, 500, (2, k, t)).astype(np.int32) * seg, "segment_ids": seg,
             "positions": np.broadcast_to(np.arange(t), (2, k, t)).astype(np.int32) * seg,
             "prompt_len": np.full((2, k), 4), "last_index": last, "ranks": np.array([[0, 1, 2], [2, 0, 1]]),
             "valid": np.ones((2, k), np.int32)}
    fn = lambda m: functools.partial(dpo.loss_fn, batch=pairs, rng=None, reference=reference, model=m, beta=0.1,  # noqa
                                     loss_type="sigmoid")
    _close(_grads(lambda p: fn(model)(p), params), _grads(lambda p: fn(chunked)(p), params))
    a, b_ = fn(model)(params)[1], fn(chunked)(params)[1]
    np.testing.assert_allclose(float(a["kl"]), float(b_["kl"]), rtol=1e-5)


def test_compiled_sft_step_never_holds_the_whole_logits():
    """XLA's own account of the compiled loss + gradient: the LM head in chunks of 32 tokens (8 positions of each
    of the 4 rows) saves more than one whole [B, T, V] float32 logits tensor of temporaries (logits 34 MB)."""
    big = dict(vocab_size=8192, max_len=256)
    model, params = model_and_params(**big)
    chunked = Transformer(dataclasses.replace(model.cfg, logits_chunk=32))
    b, t = 4, 256
    batch = {"tokens": np.zeros((b, t), np.int32), "positions": np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
             "segment_ids": np.ones((b, t), np.int32), "targets": np.zeros((b, t), np.int32),
             "loss_mask": np.ones((b, t), np.float32)}
    logits_bytes = b * t * big["vocab_size"] * 4

    def temp(m):
        step = jax.jit(jax.grad(lambda p: sft.loss_fn(p, batch, None, model=m)[0]))
        return step.lower(params).compile().memory_analysis().temp_size_in_bytes

    whole, chunks = temp(model), temp(chunked)
    assert whole > logits_bytes  # the unchunked step holds at least one full float32 logits tensor
    assert whole - chunks > logits_bytes
    # the memory plan counts one chunk's logits (and their gradient): 32 // 4 positions of each row, not 256
    full = plan.activations(model.cfg, b, t, plan.abstract_mesh((1, 1, 1)))
    part = plan.activations(chunked.cfg, b, t, plan.abstract_mesh((1, 1, 1)))
    assert full - part == b * (t - 32 // b) * 4 * 2 * big["vocab_size"]


def test_presets_chunk_where_vocabularies_are_large():
    assert config_lib.model_config("tiny").logits_chunk == 0  # the CPU presets: small vocabularies
    assert config_lib.model_config("1.3b").logits_chunk == 512
    assert config_lib.load("sft", "finetune").model.logits_chunk == 512
    with pytest.raises(ValueError, match="logits_chunk"):
        ModelConfig(logits_chunk=-1)


def test_plan_adopts_the_checkpoints_models(sft_workdir, rm_workdir, tmp_path):
    """`plan` sizes the model the stage will run: the previous export's (and PPO's reward model from
    ppo.rm_workdir), not the preset's."""
    from conftest import stage_config
    from instructgpt_jax import checkpoints
    exported = ModelConfig.from_config(checkpoints.read_export_meta(sft_workdir)["model"])
    bigger = {"model.num_layers": 6, "model.d_model": 128, "model.num_heads": 4, "model.num_kv_heads": 4,
              "model.head_dim": 32, "model.mlp_dim": 512}
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir}, **bigger)
    p = plan.plan(config, (1, 1, 1))
    n_policy = plan.param_shards(exported, "lm", plan.abstract_mesh((1, 1, 1)))[1]
    n_rm = plan.param_shards(exported, "scalar", plan.abstract_mesh((1, 1, 1)))[1]
    assert p.resident["policy params"] == 4 * n_policy  # the export's model, not the 6-layer override
    assert p.resident["reward model params"] == 4 * n_rm
    assert any(rm_workdir in n for n in p.notes)
