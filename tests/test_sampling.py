"""Tests for instructgpt_jax.sampling: cached decoding == full recompute, filters, EOS handling, mesh."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import sampling, sharding
from instructgpt_jax.models import ModelConfig, Transformer

EOS, PAD, N = 1, 0, 12
# Left-padded prompts of lengths 8, 5, 1, 3.
MASK = np.array([[1] * 8, [0, 0, 0] + [1] * 5, [0] * 7 + [1], [0] * 5 + [1] * 3], np.int32)
B, P = MASK.shape
PROMPTS = np.where(MASK == 1, np.random.RandomState(0).randint(2, 512, size=MASK.shape), 7).astype(np.int32)
CONFIGS = {"gpt": ModelConfig(), "llama": ModelConfig(arch="llama", tie_embeddings=False, num_kv_heads=2)}


def init_fn(cfg):
    return lambda rng: Transformer(cfg).init(rng, jnp.zeros((1, 4), jnp.int32))["params"]


@functools.lru_cache
def init_params(cfg):
    return jax.jit(lambda rng: nn.unbox(init_fn(cfg)(rng)))(jax.random.PRNGKey(0))


def boost_eos(params, cfg, logit_boost):
    """Raise EOS's logit by about `logit_boost` for every input (gpt: shift the ln_final bias along
    EOS's tied embedding)."""
    if cfg.arch == "gpt":
        e = params["embed"]["embedding"][EOS]
        ln = params["ln_final"]["LayerNorm_0"]
        return {**params, "ln_final": {"LayerNorm_0": {**ln, "bias": ln["bias"] + logit_boost * e / (e @ e)}}}
    # llama (RMSNorm, no bias): a constant residual dimension 0 normalises to about sqrt(d_model) = 8.
    return {**params, "embed": {"embedding": params["embed"]["embedding"].at[:, 0].add(1.0)},
            "lm_head": {"kernel": params["lm_head"]["kernel"].at[0, EOS].add(logit_boost / 8.0)}}


def full_forward_logits(cfg, params, tokens):
    """Step logits [B, N, V] by one forward pass over prompt + response, no cache."""
    segments = np.concatenate([MASK, np.ones((B, N), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0)
    return np.asarray(_forward(cfg)(params, tokens, positions, segments))[:, P - 1:-1]


@functools.lru_cache
def _forward(cfg):
    return jax.jit(lambda params, *args: Transformer(cfg).apply({"params": params}, *args))


@pytest.fixture(scope="module", params=list(CONFIGS))
def sampled(request):
    """Temperature-0.7 samples with step logits; EOS made likely enough (~10 %/step) that rows end at
    different steps."""
    cfg = CONFIGS[request.param]
    params = boost_eos(init_params(cfg), cfg, 4.0)
    sampler = sampling.make_sampler(Transformer(cfg), max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=0.7,
                                    return_logits=True)
    out = jax.device_get(sampler(params, PROMPTS, MASK, jax.random.PRNGKey(1)))
    return dict(cfg=cfg, params=params, sampler=sampler, out=out)


@pytest.fixture(scope="module")
def greedy_sample():
    cfg = CONFIGS["gpt"]
    params = init_params(cfg)
    sampler = sampling.make_sampler(Transformer(cfg), max_new_tokens=N, eos_id=EOS, pad_id=PAD, greedy=True)
    return params, sampler, jax.device_get(sampler(params, PROMPTS, MASK, jax.random.PRNGKey(0)))


def test_cached_logits_equal_full_recompute(sampled):
    out = sampled["out"]
    ref = full_forward_logits(sampled["cfg"], sampled["params"], out["tokens"])
    valid = out["response_mask"] == 1
    assert valid.sum() > B  # some rows decode several tokens
    np.testing.assert_allclose(out["logits"][valid], ref[valid], atol=1e-5, rtol=0)


def test_logprobs_are_tempered_log_softmax_of_recomputed_logits(sampled):
    out = sampled["out"]
    ref = full_forward_logits(sampled["cfg"], sampled["params"], out["tokens"])
    ref_lp = np.take_along_axis(jax.nn.log_softmax(ref / 0.7), out["response"][..., None], -1)[..., 0]
    np.testing.assert_allclose(out["logprobs"], np.where(out["response_mask"] == 1, ref_lp, 0.0), atol=1e-5)


def test_output_layout_and_eos(sampled):
    out = sampled["out"]
    np.testing.assert_array_equal(out["tokens"][:, :P], np.where(MASK == 1, PROMPTS, PAD))
    np.testing.assert_array_equal(out["tokens"][:, P:], out["response"])
    assert out["ended"].any() and (out["lengths"] > 1).any()  # the fixture exercises both
    for row, length, ended, mask in zip(out["response"], out["lengths"], out["ended"], out["response_mask"]):
        eos_at = np.flatnonzero(row == EOS)
        assert ended == (eos_at.size > 0)
        assert length == (eos_at[0] + 1 if ended else N)  # stops at the first EOS, EOS included
        np.testing.assert_array_equal(mask, np.arange(N) < length)
        assert (row[length:] == PAD).all()


def test_all_rows_end_at_once_stops_the_loop(sampled):
    params = boost_eos(sampled["params"], sampled["cfg"], 100.0)
    out = jax.device_get(sampled["sampler"](params, PROMPTS, MASK, jax.random.PRNGKey(3)))
    np.testing.assert_array_equal(out["response"], np.array([[EOS] + [PAD] * (N - 1)] * B))
    np.testing.assert_array_equal(out["lengths"], 1)
    assert out["ended"].all()
    np.testing.assert_allclose(out["logprobs"][:, 0], 0.0, atol=1e-4)  # EOS is certain at T = 0.7


def test_temperature_sampling_reproducible_and_rng_dependent(sampled):
    again = sampled["sampler"](sampled["params"], PROMPTS, MASK, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(again["tokens"], sampled["out"]["tokens"])
    other = sampled["sampler"](sampled["params"], PROMPTS, MASK, jax.random.PRNGKey(2))
    assert (np.asarray(other["tokens"]) != sampled["out"]["tokens"]).any()


def test_greedy_is_deterministic_and_ignores_rng(greedy_sample):
    params, sampler, out = greedy_sample
    other = sampler(params, PROMPTS, MASK, jax.random.PRNGKey(42))
    np.testing.assert_array_equal(other["tokens"], out["tokens"])
    # and it is the argmax of a full forward pass at every step
    ref = full_forward_logits(CONFIGS["gpt"], params, out["tokens"])
    valid = out["response_mask"] == 1
    np.testing.assert_array_equal(np.argmax(ref, -1)[valid], out["response"][valid])


@pytest.mark.parametrize("options", [dict(top_k=1), dict(top_p=1e-6), dict(greedy=True, use_cache=False)],
                         ids=str)
def test_equal_to_greedy(greedy_sample, options):
    params, _, greedy = greedy_sample
    sampler = sampling.make_sampler(Transformer(CONFIGS["gpt"]), max_new_tokens=N, eos_id=EOS, pad_id=PAD,
                                    **options)
    out = jax.device_get(sampler(params, PROMPTS, MASK, jax.random.PRNGKey(5)))
    np.testing.assert_array_equal(out["tokens"], greedy["tokens"])
    np.testing.assert_array_equal(out["response_mask"], greedy["response_mask"])


@pytest.mark.parametrize("use_cache", [True, False])
def test_stops_at_any_of_several_eos_ids(greedy_sample, use_cache):
    """A second EOS id (e.g. Llama-3's <|eot_id|> next to <|end_of_text|>): each row stops at its first
    token from the set, the greedy run cut there, with or without the cache."""
    params, _, greedy = greedy_sample
    resp = greedy["response"]
    second = int(resp[0, 2]) if resp[0, 2] != EOS else int(resp[0, 1])  # a token greedy decoding emits
    sampler = sampling.make_sampler(Transformer(CONFIGS["gpt"]), max_new_tokens=N, eos_id=[EOS, second],
                                    pad_id=PAD, greedy=True, use_cache=use_cache)
    out = jax.device_get(sampler(params, PROMPTS, MASK, jax.random.PRNGKey(0)))
    for b in range(B):
        hits = np.flatnonzero(np.isin(resp[b], [EOS, second]))
        n = hits[0] + 1 if hits.size else N
        assert out["lengths"][b] == n and out["ended"][b] == bool(hits.size)
        np.testing.assert_array_equal(out["response"][b, :n], resp[b, :n])
        assert (out["response"][b, n:] == PAD).all()
    assert out["ended"][0] and out["lengths"][0] <= 3
    with pytest.raises(ValueError, match="PAD must never be an EOS"):
        sampling.sample(params, PROMPTS, MASK, None, model=Transformer(CONFIGS["gpt"]), max_new_tokens=2,
                        eos_id=(EOS, PAD), pad_id=PAD)


def test_filter_logits_hand():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    assert np.isfinite(sampling.filter_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    # nucleus: 0.4 (< 0.5 so far), then 0.3 reaches 0.7 >= 0.5 -> {0.4, 0.3}
    assert np.isfinite(sampling.filter_logits(logits, top_p=0.5)).tolist() == [[False, True, False, True]]
    assert np.isfinite(sampling.filter_logits(logits, top_p=0.75)).tolist() == [[False, True, True, True]]
    assert np.isfinite(sampling.filter_logits(logits, top_k=3, top_p=0.5)).all(axis=-1).tolist() == [False]


def test_sample_token_temperature_zero_is_argmax():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.2, 0.2]]))
    tokens, logprobs = sampling.sample_token(logits, jax.random.PRNGKey(0), temperature=0.0)
    np.testing.assert_array_equal(tokens, [1, 0])
    np.testing.assert_allclose(logprobs, np.log([0.4, 0.5]), rtol=1e-6)  # under the untempered model


def _chi_square_p_value(counts, probs):
    from scipy import stats
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was sampled"
    return stats.chisquare(counts[keep], counts.sum() * probs[keep] / probs[keep].sum()).pvalue


@pytest.mark.parametrize("case", ["plain", "top_k", "top_p", "peaked"])
def test_categorical_matches_softmax(case):
    """Chi-square goodness of fit of 40k draws against softmax(logits), over 3 blocks with a ragged last
    one (V = 700, block 256), with -inf holes and mass spread across block boundaries."""
    rng = np.random.default_rng(0)
    v, n = 700, 40_000
    logits = rng.normal(size=v).astype(np.float32) * 2.0
    if case == "top_k":
        logits = np.asarray(sampling.filter_logits(jnp.asarray(logits[None]), top_k=37))[0]
    if case == "top_p":
        logits = np.asarray(sampling.filter_logits(jnp.asarray(logits[None]), top_p=0.6))[0]
    if case == "peaked":  # one token with ~all the mass, a few rare ones in the last (ragged) block
        logits = np.full(v, -np.inf, np.float32)
        logits[[3, 255, 256, 690, 699]] = [12.0, 5.0, 5.0, 6.0, 4.0]
    tokens = jax.jit(sampling.categorical)(jax.random.PRNGKey(1), jnp.broadcast_to(jnp.asarray(logits), (n, v)))
    counts = np.bincount(np.asarray(tokens), minlength=v)
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float64)
    assert _chi_square_p_value(counts, probs) > 1e-3


def test_categorical_rows_independent_and_edge_blocks():
    # Row 0 all mass on the very last token, row 1 on the first, row 2 uniform over one block.
    v = 512
    logits = np.full((3, v), -np.inf, np.float32)
    logits[0, v - 1] = 0.0
    logits[1, 0] = 0.0
    logits[2, 256:] = 1.0
    tokens = np.asarray(jax.vmap(lambda k: sampling.categorical(k, jnp.asarray(logits)))(
        jax.random.split(jax.random.PRNGKey(0), 2000)))
    assert (tokens[:, 0] == v - 1).all() and (tokens[:, 1] == 0).all()
    assert tokens[:, 2].min() >= 256
    assert _chi_square_p_value(np.bincount(tokens[:, 2] - 256, minlength=256), np.ones(256)) > 1e-3


def test_left_pad_positions():
    np.testing.assert_array_equal(sampling.left_pad_positions(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_prompt_too_long_for_position_table():
    with pytest.raises(ValueError, match="max_len"):
        sampling.sample(init_params(CONFIGS["gpt"]), PROMPTS, MASK, jax.random.PRNGKey(0),
                        model=Transformer(CONFIGS["gpt"]), max_new_tokens=200, eos_id=EOS, pad_id=PAD)


def test_sharded_params_on_a_mesh(greedy_sample):
    """Params sharded by their logical axes and the batch over the batch axes on a (1-device) mesh:
    the KV cache is constrained to its logical axes and the samples are unchanged."""
    params, _, greedy = greedy_sample
    cfg = CONFIGS["gpt"]
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    _, shardings = sharding.param_shardings(init_fn(cfg), mesh)
    args = (jax.device_put(params, shardings), *(jax.device_put(x, sharding.batch_sharding(mesh, 2))
                                                 for x in (PROMPTS, MASK)), jax.random.PRNGKey(0))
    with sharding.use(mesh):
        sampler = sampling.make_sampler(Transformer(cfg), max_new_tokens=N, eos_id=EOS, pad_id=PAD, greedy=True)
        hlo = sampler.lower(*args).as_text()
        out = sampler(*args)
    cache_shape = f"tensor<{cfg.num_layers}x{B}x{cfg.num_kv_heads}x{P + N}x{cfg.head_dim}xf32>"
    assert any("sharding_constraint" in line and cache_shape in line for line in hlo.splitlines())
    np.testing.assert_array_equal(out["tokens"], greedy["tokens"])
    np.testing.assert_allclose(out["logprobs"], greedy["logprobs"], atol=1e-6)
