"""Model: preset sizes, packing isolation, heads, dtypes, logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import config_lib
from instructgpt_jax.models import ModelConfig, Transformer, param_count


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


def test_every_weight_has_logical_axes():
    specs = nn.get_partition_spec(_abstract_params("tiny"))["params"]
    shapes = nn.unbox(_abstract_params("tiny"))["params"]
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                           jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape)


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


def test_remat_gives_same_gradients():
    x = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    grads = []
    for remat in ("none", "full"):
        model = Transformer(ModelConfig(remat=remat))
        params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x))["params"]
        grads.append(jax.jit(jax.grad(lambda p: model.apply({"params": p}, x).sum()))(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_bad_model_config_names_key():
    with pytest.raises(ValueError, match="config.model.arch"):
        ModelConfig(arch="rnn")
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
