"""Model: preset sizes, packing isolation, heads, dtypes, logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import config_lib
from instructgpt_jax.models import ModelConfig, Transformer, param_count
from instructgpt_jax.models.transformer import (attention, attention_mask, causal_attention, embedding_scale,
                                                rope_inv_freq, window_mask)


def _abstract_params(preset):
    cfg = ModelConfig.from_config(config_lib.model_config(preset))
    model = Transformer(cfg)
    return jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.PRNGKey(0))


@pytest.mark.parametrize("preset", sorted(config_lib.NOMINAL_PARAMS))
def test_preset_param_count_matches_nominal(preset):
    n = param_count(nn.unbox(_abstract_params(preset))["params"])
    nominal = config_lib.NOMINAL_PARAMS[preset]
    assert abs(n - nominal) / nominal < 0.05, f"{preset}: {n / 1e6:.1f}M vs nominal {nominal / 1e6:.1f}M"


def test_gpt3_125m_count_by_hand():
    # 12 layers x (4 d^2 attn + 4 d bias... ) computed independently of the model code
    d, L, V, ctx, mlp = 768, 12, 50304, 2048, 3072  # vocab padded to a multiple of 128
    per_layer = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 4 * d  # attn w+b, mlp w+b, two LayerNorms
    expected = V * d + ctx * d + L * per_layer + 2 * d
    assert param_count(nn.unbox(_abstract_params("125m"))["params"]) == expected


# one preset per family: every weight, new ones included, carries its logical axes
@pytest.mark.parametrize("preset", ["tiny", "tinyllama-1.1b", "qwen2.5-0.5b", "qwen3-0.6b", "gemma2-2b", "pythia-160m"])
def test_every_weight_has_logical_axes(preset):
    abstract = _abstract_params(preset)
    specs = nn.get_partition_spec(abstract)["params"]
    shapes = nn.unbox(abstract)["params"]
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape)
    attn, layers = specs["layers"]["attn"], specs["layers"]
    if preset.startswith("qwen2"):
        assert tuple(attn["query"]["bias"]) == ("layers", "heads", "head_dim")
        assert tuple(attn["key"]["bias"]) == ("layers", "kv_heads", "head_dim") and "bias" not in attn["out"]
    if preset.startswith("qwen3"):
        assert tuple(attn["q_norm"]["scale"]) == ("layers", "norm") and "bias" not in attn["query"]
    if preset.startswith("gemma2"):
        assert tuple(layers["ln_post_attn"]["scale"]) == tuple(layers["ln_post_mlp"]["scale"]) == ("layers", "norm")
    if preset.startswith("pythia"):
        assert tuple(layers["mlp"]["wi"]["bias"]) == ("layers", "mlp") and "pos_embed" not in specs
        assert tuple(specs["lm_head"]["kernel"]) == ("embed", "vocab")


def test_family_keys_are_validated_and_resolved():
    assert [ModelConfig(arch=a).activation for a in ("gpt", "llama", "neox")] == ["gelu_tanh", "silu", "gelu"]
    assert ModelConfig(arch="llama", activation="gelu_tanh").activation == "gelu_tanh"
    assert ModelConfig(num_layers=5, sliding_window=4, sliding_pattern="SSF").layer_windows == (4, 4, 0, 4, 4)
    assert ModelConfig(arch="neox", head_dim=64, rotary_pct=0.25).rotary_dim == 16
    for kw, key in [(dict(activation="relu"), "activation"), (dict(sliding_pattern="SG"), "sliding_pattern"),
                    (dict(arch="llama", rotary_pct=0.0), "rotary_pct"), (dict(qkv_bias=True), "qkv_bias"),
                    (dict(arch="llama", rope_scaling="yarn"), "rope_scaling"), (dict(attn_softcap=-1.0), "attn_softcap"),
                    (dict(rotary_pct=0.5), "rotary_pct")]:
        with pytest.raises(ValueError, match=f"config.model.{key}"):
            ModelConfig(**kw)


def test_window_mask_is_a_band_of_window_slots():
    causal = jnp.tril(jnp.ones((5, 5), bool))[None, None]
    distance = jnp.arange(5)[:, None] - jnp.arange(5)[None, :]
    got = np.asarray(window_mask(causal, distance, jnp.int32(2)))[0, 0].astype(int)
    np.testing.assert_array_equal(got, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0],
                                        [0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(window_mask(causal, distance, jnp.int32(0)), causal)  # 0 = full attention


def test_llama3_rope_frequencies_by_hand():
    # theta 10000, dim 8: wavelengths 2*pi*[1, 10, 100, 1000]; original 1024 -> stretched above 1024,
    # kept below 256, in between (2*pi*100) interpolated with s = (1024 / wavelength - 1) / 3
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=1024)
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    s = (1024 / (2 * np.pi * 100) - 1) / 3
    assert 0 < s < 1
    want = [inv[0], inv[1], (1 - s) * inv[2] / 8 + s * inv[2], inv[3] / 8]
    np.testing.assert_allclose(rope_inv_freq(10000.0, 8, scaling), want, rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(10000.0, 8), inv, rtol=1e-6)


def test_embedding_scale_is_rounded_to_the_compute_dtype():
    assert float(embedding_scale(48, jnp.bfloat16)) == 6.9375  # sqrt(48) = 6.928..., as transformers' bf16 Gemma
    assert float(embedding_scale(48, jnp.float32)) == float(np.float32(np.sqrt(48)))


@pytest.fixture(scope="module", params=["gpt", "llama"])
def tiny(request):
    arch = request.param
    cfg = ModelConfig(arch=arch, tie_embeddings=arch == "gpt", num_kv_heads=2 if arch == "llama" else 4)
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    return cfg, jax.jit(model.apply), params


def test_packed_examples_do_not_see_each_other(tiny):
    cfg, apply, params = tiny
    rng = np.random.default_rng(0)
    a, b = rng.integers(4, cfg.vocab_size, 5), rng.integers(4, cfg.vocab_size, 7)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 7 + [0, 0]])
    pos = np.array([list(range(5)) + list(range(7)) + [0, 0]])
    out = apply({"params": params}, packed, pos, seg)
    out_a = apply({"params": params}, a[None])
    out_b = apply({"params": params}, b[None])
    np.testing.assert_allclose(out[0, :5], out_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:12], out_b[0], atol=1e-5)


def test_left_padding_is_invisible(tiny):
    cfg, apply, params = tiny
    x = np.random.default_rng(1).integers(4, cfg.vocab_size, 6)
    padded = np.concatenate([[0, 0, 0], x])[None]
    seg = np.array([[0, 0, 0] + [1] * 6])
    pos = np.array([[0, 0, 0] + list(range(6))])
    np.testing.assert_allclose(apply({"params": params}, padded, pos, seg)[0, 3:],
                               apply({"params": params}, x[None])[0], atol=1e-5)


def test_scalar_head_shares_trunk_and_shape(tiny):
    cfg, apply, params = tiny
    scalar = Transformer(cfg, head="scalar")
    sp = nn.unbox(jax.jit(scalar.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))["params"]
    assert set(sp) - set(params) == {"scalar_head"}
    assert sp["scalar_head"]["kernel"].shape == (cfg.d_model, 1)
    np.testing.assert_array_equal(sp["scalar_head"]["bias"], 0.0)
    out = jax.jit(scalar.apply)({"params": sp}, jnp.ones((2, 5), jnp.int32))
    assert out.shape == (2, 5) and out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params():
    cfg = ModelConfig(dtype="bfloat16")
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    f32 = jax.jit(Transformer(ModelConfig()).apply)({"params": params}, jnp.ones((1, 8), jnp.int32))
    bf16 = jax.jit(model.apply)({"params": params}, jnp.ones((1, 8), jnp.int32))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), f32, atol=0.05)


def test_dropout_only_in_training():
    cfg = ModelConfig(dropout=0.5)
    model = Transformer(cfg)
    x = jnp.ones((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x))["params"]
    apply = jax.jit(model.apply, static_argnames="deterministic")
    a = apply({"params": params}, x)
    np.testing.assert_array_equal(a, apply({"params": params}, x))
    b = apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.allclose(a, b)


@pytest.mark.parametrize("kv_heads", [pytest.param(4, marks=pytest.mark.slow), 2])
def test_attention_matches_dot_product_attention(kv_heads):
    """Our attention (post-normalised, stop-gradient shift) vs jax.nn.dot_product_attention: values and
    gradients, grouped-query too, with a causal + segment mask that leaves one row with no visible key."""
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    b, t, n, d = 2, 6, 4, 8
    q = jax.random.normal(ks[0], (b, t, n, d)) * 3.0
    k = jax.random.normal(ks[1], (b, t, kv_heads, d))
    v = jax.random.normal(ks[2], (b, t, kv_heads, d))
    segments = jnp.array([[0, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]])
    mask = attention_mask(segments, segments, jnp.broadcast_to(jnp.arange(t), (b, t)))
    cot = jax.random.normal(ks[3], (b, t, n, d))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask=mask) * cot * (segments[..., None, None] > 0))

    ours = lambda q, k, v, mask: attention(q, k, v, mask)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v, mask)[segments > 0],
                               jax.nn.dot_product_attention(q, k, v, mask=mask)[segments > 0], rtol=1e-5, atol=1e-5)
    assert np.isfinite(ours(q, k, v, mask)).all()  # the padding row gets a finite value
    for g_ours, g_ref in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v),
                             jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-4, atol=1e-5)


def test_attention_over_cache_equals_attention_over_concatenation():
    ks = jax.random.split(jax.random.PRNGKey(1), 5)
    b, t, s, n, kh, d = 2, 3, 5, 4, 2, 8
    q = jax.random.normal(ks[0], (b, t, n, d))
    k, v = jax.random.normal(ks[1], (b, t, kh, d)), jax.random.normal(ks[2], (b, t, kh, d))
    kc, vc = jax.random.normal(ks[3], (b, kh, s, d)), jax.random.normal(ks[4], (b, kh, s, d))
    mask_cache = jax.random.bernoulli(ks[0], 0.6, (b, 1, t, s)).at[..., 0].set(True)
    mask_new = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, 1, t, t))
    full = jax.nn.dot_product_attention(q, jnp.concatenate([kc.transpose(0, 2, 1, 3), k], 1),
                                        jnp.concatenate([vc.transpose(0, 2, 1, 3), v], 1),
                                        mask=jnp.concatenate([mask_cache, mask_new], -1))
    np.testing.assert_allclose(attention(q, k, v, mask_new, (kc, vc, mask_cache)), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("blocks", [pytest.param(2, marks=pytest.mark.slow), 4, 3])  # 3 does not divide the length: one block
def test_causal_blocks_equal_full_attention(blocks):
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    b, t, n, d = 2, 8, 4, 8
    q, k, v, cot = (jax.random.normal(kk, (b, t, n, d)) for kk in ks)
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    mask = attention_mask(segments, segments, jnp.broadcast_to(jnp.arange(t), (b, t)))
    f = lambda blocks: lambda q, k, v: jnp.sum(causal_attention(q, k, v, mask, blocks) * cot)  # noqa: E731
    np.testing.assert_allclose(causal_attention(q, k, v, mask, blocks), attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
    for g_blocks, g_one in zip(jax.grad(f(blocks), (0, 1, 2))(q, k, v), jax.grad(f(1), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_blocks, g_one, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_speed_keys_change_nothing_but_speed():
    x = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 7
    model = Transformer(ModelConfig(num_layers=3))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x))["params"]
    outs = [Transformer(ModelConfig(num_layers=3, scan_unroll=u, causal_blocks=c)).apply({"params": params}, x)
            for u, c in ((1, 1), (2, 1), (3, 4))]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)
    for key in ("scan_unroll", "causal_blocks"):
        with pytest.raises(ValueError, match=f"config.model.{key}"):
            ModelConfig(**{key: 0})


def test_remat_gives_same_gradients():
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    grads = []
    for remat in ("none", "full", "dots"):
        model = Transformer(ModelConfig(remat=remat))
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x))["params"]
        grads.append(jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params))
    for other in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads[0], other)


def test_full_size_presets_and_checkpoints_rematerialise():
    """Memory first where models are real (the CPU presets are small enough to keep every activation)."""
    assert [config_lib.model_config(p).remat for p in ("tiny", "mini", "small")] == ["none"] * 3
    assert config_lib.model_config("smollm2-135m").remat == config_lib.model_config("1.3b").remat == "full"
    assert config_lib.load("sft", "finetune").model.remat == "full"


def test_bad_model_config_names_key():
    with pytest.raises(ValueError, match="config.model.arch"):
        ModelConfig(arch="rnn")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)


def test_bfloat16_attention_equals_a_float64_reference_over_cache_and_new_keys():
    """bfloat16 inputs at SmolLM2's widths (9 query heads over 3 KV heads of 64), keys in a cache and new ones:
    within bfloat16's resolution of a float64 softmax over the same (rounded) values."""
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    b, t, s, n, kh, d = 2, 4, 6, 9, 3, 64
    q = jax.random.normal(ks[0], (b, t, n, d), jnp.bfloat16)
    k, v = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16), jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    kc, vc = jax.random.normal(ks[3], (b, kh, s, d), jnp.bfloat16), jax.random.normal(ks[4], (b, kh, s, d), jnp.bfloat16)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, 1, t, t))
    mask_cache = jnp.ones((b, 1, t, s), bool).at[0, :, :, :2].set(False)
    out = attention(q, k, v, mask, (kc, vc, mask_cache))
    assert out.dtype == jnp.bfloat16

    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    keys = np.concatenate([f(kc), f(k).transpose(0, 2, 1, 3)], axis=2)  # [B, K, S + T, D]
    vals = np.concatenate([f(vc), f(v).transpose(0, 2, 1, 3)], axis=2)
    visible = np.concatenate([np.asarray(mask_cache), np.asarray(mask)], axis=-1)[:, 0]  # [B, T, S + T]
    group = np.repeat(np.arange(kh), n // kh)  # query head -> its KV head
    scores = np.einsum("btnd,bnsd->bnts", f(q), keys[:, group]) / np.sqrt(d)
    scores = np.where(visible[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bnts,bnsd->btnd", p / p.sum(-1, keepdims=True), vals[:, group])
    np.testing.assert_allclose(f(out), ref, atol=2e-2, rtol=2e-2)


def test_bfloat16_sampling_and_scoring_run_on_cpu_at_real_widths():
    """XLA:CPU's library dot has no bfloat16 x bfloat16 -> float32 form, which the attention's float32 scores asked
    for: at SmolLM2-135M's widths (9 heads of 64, 3 KV heads) a bfloat16 rollout failed at run time. The sampler's
    log-probs and the scoring pass agree."""
    from instructgpt_jax import sampling, scoring
    cfg = ModelConfig(arch="llama", vocab_size=512, num_layers=1, d_model=576, num_heads=9, num_kv_heads=3,
                      head_dim=64, mlp_dim=1536, max_len=256, dtype="bfloat16", tie_embeddings=True, remat="full")
    model = Transformer(cfg)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.ones((8, 64), jnp.int32)))["params"]
    sampler = sampling.make_sampler(model, max_new_tokens=64, eos_id=[1], pad_id=0)
    out = sampler(params, np.ones((8, 64), np.int32), np.ones((8, 64), bool), jax.random.PRNGKey(0))
    tokens = out["tokens"]
    positions, segments = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape), jnp.ones_like(tokens)
    logp, _ = jax.jit(lambda p: scoring.response_logprobs(p, model, tokens, positions, segments, 64))(params)
    mask = np.asarray(out["response_mask"], bool)  # after an EOS the sampler pads
    assert mask.sum() > 100
    np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(out["logprobs"])[mask], atol=0.05)
