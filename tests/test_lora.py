"""LoRA / QLoRA: the quantisers against brute-force references, the adapted model (step 0 = base, merge =
forward, targets, rsLoRA, dropout in training only), trainable-only gradients and optimizer state, bases
shared (no copies), and an SFT LoRA run resumed exactly. PEFT export / import and the RL stages:
test_lora_stages.py."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import BUILTIN, Interrupt, interrupting, stage_config

from instructgpt_jax import checkpoints, config_lib, lora, sft, sharding, train_lib
from instructgpt_jax.errors import UserError
from instructgpt_jax.models import ModelConfig, Transformer, quant

MESH = None


def _mesh():
    global MESH
    MESH = MESH or sharding.default_mesh()
    return MESH


def tiny(arch="llama", **lora_keys):
    config = config_lib.load("sft", "tiny", **{f"lora.{k}": v for k, v in lora_keys.items()})
    config.model.arch = arch
    return config


_SETUPS = {}


def setup(config, seed=0):
    """(model, base params, trainable, base) of a tiny LoRA model, built once per config (compiling the inits
    dominates these tests)."""
    key = (config.to_json(), seed)
    if key not in _SETUPS:
        model = Transformer(lora.model_config(config))
        params = sharding.init_model(lora.plain(model), jax.random.PRNGKey(seed), _mesh())
        trainable, base = lora.setup(config, model, params, jax.random.PRNGKey(seed + 1), _mesh())
        _SETUPS[key] = model, params, trainable, base
    return _SETUPS[key]


TOKENS = jnp.arange(24).reshape(3, 8) % 500


@functools.partial(jax.jit, static_argnums=(0, 3))
def fwd(model, params, tokens, deterministic=True, rng=None):
    """model.apply, jitted (one compile per model and mode instead of op-by-op dispatch)."""
    return model.apply({"params": params}, tokens, deterministic=deterministic,
                       rngs=None if rng is None else {"dropout": rng})


# ----------------------------------------------------------------------------- quantisers

def test_nf4_matches_a_brute_force_codebook_reference():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (2, 128, 6)).astype(np.float32)  # [layers, in, out]
    w[0, 5, 1] = 0.0
    codes, absmax = quant.quantize(jnp.asarray(w), 1, "nf4", lead=1)
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 128, 3) and absmax.shape == (2, 2, 6)
    # brute force: per block of 64 inputs of one output, the nearest codebook value times the block's absmax
    ref = np.empty_like(w)
    idx_ref = np.empty(w.shape, np.int64)
    for layer in range(2):
        for o in range(6):
            for blk in range(2):
                x = w[layer, blk * 64:(blk + 1) * 64, o]
                m = np.abs(x).max()
                assert absmax[layer, blk, o] == pytest.approx(m)
                idx = np.argmin(np.abs(x[:, None] / m - quant.NF4[None, :]), axis=1)
                idx_ref[layer, blk * 64:(blk + 1) * 64, o] = idx
                ref[layer, blk * 64:(blk + 1) * 64, o] = quant.NF4[idx] * m
    # packing: the even element of each pair in the high nibble
    np.testing.assert_array_equal(np.asarray(codes), (idx_ref[..., 0::2] << 4) | idx_ref[..., 1::2])
    back = np.asarray(quant.dequantize_stacked(codes, absmax))
    np.testing.assert_allclose(back, ref, rtol=1e-6, atol=1e-9)
    assert back[0, 5, 1] == 0.0  # the codebook's exact zero
    assert np.abs(back - w).max() <= np.abs(w).max() * (1 - quant.NF4[-2]) / 2 + 1e-7  # half the widest gap


def test_int8_per_channel_matches_a_brute_force_reference():
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1.0, (2, 4, 8, 5)).astype(np.float32)  # [layers, heads, head_dim, out]: two input axes
    codes, scale = quant.quantize(jnp.asarray(w), 2, "int8", lead=1)
    assert codes.dtype == jnp.int8 and scale.shape == (2, 5)
    s = np.abs(w).max(axis=(1, 2)) / 127.0
    np.testing.assert_allclose(np.asarray(scale), s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(codes), np.clip(np.round(w / s[:, None, None, :]), -127, 127))
    back = np.asarray(quant.dequantize_stacked(codes, scale))
    assert np.abs(back - w).max() <= s.max() / 2 + 1e-6


def test_nf4_refuses_widths_that_do_not_block():
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.quantize(jnp.ones((48, 4)), 1, "nf4")


# ----------------------------------------------------------------------------- the adapted model

@pytest.mark.parametrize("arch", [pytest.param("llama", marks=pytest.mark.slow), "gpt"])  # llama: default budget
def test_step_zero_equals_the_base_and_merge_equals_the_adapted_forward(arch):
    config = tiny(arch, rank=4, alpha=8.0)
    model, params, trainable, base = setup(config)
    assert base is params  # float32 base: the starting params themselves, not a copy
    full = lora.combine(trainable, base)
    assert full["embed"]["embedding"] is params["embed"]["embedding"]
    np.testing.assert_array_equal(fwd(model, full, TOKENS), fwd(lora.plain(model), params, TOKENS))
    moved = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(3), x.shape), trainable)
    adapted = fwd(model, lora.combine(moved, base), TOKENS)
    merged = fwd(lora.plain(model), lora.merge(moved, base, model.cfg), TOKENS)
    np.testing.assert_allclose(adapted, merged, atol=2e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(fwd(lora.plain(model), params, TOKENS))).max() > 1e-2


def test_adapter_shapes_targets_and_scale():
    config = tiny(rank=4, alpha=8.0, targets="q,down")
    model, _, trainable, _ = setup(config)
    cfg = model.cfg
    assert set(trainable["layers"]["attn"]) == {"query"} and set(trainable["layers"]["mlp"]) == {"wo"}
    assert trainable["layers"]["attn"]["query"]["lora_a"].shape == (2, 64, 4)
    assert trainable["layers"]["attn"]["query"]["lora_b"].shape == (2, 4, 4, 16)
    assert trainable["layers"]["mlp"]["wo"]["lora_a"].shape == (2, 256, 4)
    assert not np.asarray(trainable["layers"]["mlp"]["wo"]["lora_b"]).any()  # B starts at zero
    a = np.asarray(trainable["layers"]["mlp"]["wo"]["lora_a"])
    assert a.std() == pytest.approx(1 / 4, rel=0.1)  # A ~ N(0, 1/r)
    assert cfg.lora_scale == 2.0
    assert dataclasses.replace(cfg, lora_rslora=True).lora_scale == 4.0  # alpha / sqrt(r)
    gpt = ModelConfig.from_config(tiny("gpt").model, tiny("gpt", rank=2).lora)
    from instructgpt_jax.models.transformer import lora_modules
    assert lora_modules(gpt) == ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/wi", "mlp/wo")
    with pytest.raises(ValueError, match="gate"):
        ModelConfig.from_config(tiny("gpt").model, tiny("gpt", rank=2, targets="gate").lora)


def test_the_scale_multiplies_the_update():
    """W' - W = (alpha / r) A B (rsLoRA: alpha / sqrt(r)), by hand; the forward equals the merged model (above)."""
    model, params, trainable, base = setup(tiny(rank=4, alpha=8.0))
    moved = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.PRNGKey(5), x.shape), trainable)
    for keys, scale in ((dict(lora_alpha=2.0), 0.5), (dict(lora_alpha=4.0), 1.0),
                        (dict(lora_alpha=4.0, lora_rslora=True), 2.0)):
        merged = lora.merge(moved, base, dataclasses.replace(model.cfg, **keys))["layers"]["mlp"]["wi_up"]["kernel"]
        ab = moved["layers"]["mlp"]["wi_up"]
        np.testing.assert_allclose(merged - params["layers"]["mlp"]["wi_up"]["kernel"],
                                   scale * np.einsum("lir,lro->lio", ab["lora_a"], ab["lora_b"]), atol=1e-7)


def test_rank_zero_is_the_plain_model_exactly():
    config = tiny()
    assert lora.model_config(config) == ModelConfig.from_config(config.model)
    model, params, trainable, base = setup(config)
    assert base is None and trainable is params
    assert lora.merge(trainable, base, model.cfg) is params


def test_lora_dropout_only_in_training():
    model, _, trainable, base = setup(tiny(rank=4, alpha=8.0, dropout=0.5))
    moved = lora.combine(jax.tree.map(lambda x: x + 0.1, trainable), base)
    a = fwd(model, moved, TOKENS)
    np.testing.assert_array_equal(a, fwd(model, moved, TOKENS))
    b = fwd(model, moved, TOKENS, False, jax.random.PRNGKey(0))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_quantised_bases_store_less_and_stay_close():
    config = tiny(rank=4, alpha=8.0)
    model, params, trainable, _ = setup(config)
    ref = fwd(lora.plain(model), params, TOKENS)
    proj = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
               if "layers" in jax.tree_util.keystr(p) and "kernel" in jax.tree_util.keystr(p))
    rest = sum(x.nbytes for x in jax.tree.leaves(params)) - 4 * proj
    expect = {"bfloat16": rest + 2 * proj, "int8": None, "nf4": rest + proj // 2 + 4 * (proj // 64)}
    for fmt, tol in (("bfloat16", 0.02), ("int8", 0.05), ("nf4", 0.6)):
        base = lora.store_base(params, fmt)
        if expect[fmt] is not None:
            assert sum(x.nbytes for x in jax.tree.leaves(base)) == expect[fmt], fmt
        out = fwd(model, lora.combine(trainable, base), TOKENS)
        assert np.abs(np.asarray(out) - np.asarray(ref)).max() < tol, fmt
        assert base["embed"]["embedding"] is params["embed"]["embedding"]  # embeddings stay float32, shared


def test_bad_lora_config_is_a_clear_error():
    for keys, match in ((dict(base_dtype="nf8"), "base_dtype"), (dict(rank=4, targets="qq"), "targets"),
                        (dict(base_dtype="nf4"), "rank > 0"), (dict(rank=-1), "rank")):
        with pytest.raises(UserError, match=match):
            lora.check_config(tiny(**keys))
    odd = tiny(rank=4, base_dtype="nf4")
    odd.model.d_model = 48
    with pytest.raises(UserError, match="multiples of 64.*d_model=48"):
        lora.check_config(odd)


# ----------------------------------------------------------------------------- training

@pytest.mark.slow  # two compiled train steps: default-suite budget (CI runs `pytest -m slow`)
def test_gradients_and_optimizer_state_exist_for_the_adapters_only():
    config = tiny(rank=4, alpha=8.0)
    model, params, trainable, base = setup(config)
    config.optim.warmup_steps = 0
    from instructgpt_jax import sft as sft_stage
    tx = train_lib.make_optimizer(config.optim, 10)
    state = train_lib.new_state(trainable, tx)
    n_trainable = sum(x.size for x in jax.tree.leaves(trainable))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    assert n_opt <= 2 * n_trainable + 8 and n_trainable < 0.2 * sum(x.size for x in jax.tree.leaves(params))
    batch = {"tokens": TOKENS, "positions": jnp.broadcast_to(jnp.arange(8), (3, 8)),
             "segment_ids": jnp.ones((3, 8), jnp.int32), "targets": jnp.roll(TOKENS, -1, axis=1),
             "loss_mask": jnp.ones((3, 8), jnp.float32)}
    loss_fn = lora.with_base(lambda p, b, r, f: sft_stage.loss_fn(p, b, r, f, model=model))
    step = jax.jit(lambda s: train_lib.train_step(s, batch, jax.random.PRNGKey(0), (base, None), loss_fn=loss_fn,
                                                  tx=tx))
    one, metrics = step(state)
    two, _ = step(one)
    assert metrics["grad_norm"] > 0
    for before, after, moves in ((trainable, one["params"], "lora_b"), (one["params"], two["params"], "lora_a")):
        for path, d in jax.tree_util.tree_leaves_with_path(
                jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), after, before)):
            # step 1: B moves, A's gradient is exactly 0 (B = 0); step 2: A moves too
            assert (d > 0) == (moves in jax.tree_util.keystr(path) or moves == "lora_a"), (path, d)


@pytest.mark.slow  # three short SFT runs; default-suite budget (CI runs `pytest -m slow` too)
def test_sft_lora_resumes_exactly_and_exports_merged_weights_and_adapters(tmp_path, monkeypatch):
    """A LoRA SFT run interrupted after step 7 (checkpoint at 5) and rerun: steps 6..10 equal the straight run's.
    Its export holds the merged weights, the adapters and their config."""
    from instructgpt_jax.data import prepare
    keys = {"lora.rank": 4, "lora.alpha": 8.0, "train.num_steps": 10, "train.checkpoint_every": 5}
    straight = str(tmp_path / "straight")
    sft.train(stage_config("sft", **keys), straight, builtin_data=BUILTIN)
    original = prepare.StageData.train_iterator

    def interrupted(self):
        return interrupting(original(self), after=7)
    workdir = str(tmp_path / "resumed")
    monkeypatch.setattr(prepare.StageData, "train_iterator", interrupted)
    with pytest.raises(Interrupt):
        sft.train(stage_config("sft", **keys), workdir, builtin_data=BUILTIN)
    monkeypatch.setattr(prepare.StageData, "train_iterator", original)
    sft.train(stage_config("sft", **keys), workdir, builtin_data=BUILTIN)
    a = {r["step"]: r["loss"] for r in train_lib.read_metrics(straight)}
    b = {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir)}
    np.testing.assert_allclose([b[s] for s in range(6, 11)], [a[s] for s in range(6, 11)], rtol=1e-6)
    assert a[10] < a[1]  # it learns

    meta = checkpoints.read_export_meta(straight)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base_dtype"] == "float32"
    adapter = checkpoints.load_adapter(straight)
    assert set(adapter["layers"]["attn"]) == {"query", "key", "value", "out"}
    plain = Transformer(ModelConfig.from_config(meta["model"]))
    merged = checkpoints.load_params(straight, plain, _mesh())
    assert "lora_a" not in merged["layers"]["attn"]["query"]
    # merged = W + (alpha / r) A B: the scratch base is seed-determined (config.seed), so rebuild and compare
    base = sharding.init_model(plain, jax.random.PRNGKey(0), _mesh())
    a_q, b_q = adapter["layers"]["attn"]["query"]["lora_a"], adapter["layers"]["attn"]["query"]["lora_b"]
    delta = np.einsum("lir,lrhd->lihd", a_q, b_q)
    np.testing.assert_allclose(merged["layers"]["attn"]["query"]["kernel"],
                               np.asarray(base["layers"]["attn"]["query"]["kernel"]) + 2.0 * delta, atol=1e-6)


@pytest.mark.slow  # a command-line subprocess: default-suite budget
def test_adapter_export_of_a_full_fine_tuning_run_is_a_one_line_error(sft_workdir, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    out = subprocess.run([sys.executable, "-m", "instructgpt_jax.hf", f"--export={sft_workdir}",
                          f"--out={tmp_path / 'a'}", "--adapter"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "was not trained with LoRA" in out.stderr and not (tmp_path / "a").exists()
