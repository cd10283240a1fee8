"""Hugging Face import/export: logits parity with transformers (torch, CPU), round trips, bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from instructgpt_jax import hf  # noqa: E402
from instructgpt_jax.models import Transformer  # noqa: E402

V, T = 256, 16


def _hf_model(kind, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "gpt2":  # initializer_range 0.1: logits of order 1, so a wrong layout cannot hide under 1e-4
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64,
                                      initializer_range=0.1)
        return transformers.GPT2LMHeadModel(cfg).eval().to(dtype)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=V, rope_theta=500000.0, initializer_range=0.1,
                                   tie_word_embeddings=kind == "llama_tied")
    return transformers.LlamaForCausalLM(cfg).eval().to(dtype)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """kind -> (HF directory, the torch model saved there)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model = _hf_model(kind)
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path, safe_serialization=True)
            cache[kind] = (path, model)
        return cache[kind]
    return get


def _tokens(seed=0, b=2):
    return np.random.RandomState(seed).randint(0, V, (b, T))


def _hf_logits(model, tokens, **kw):
    with torch.no_grad():
        kw = {k: torch.tensor(v) for k, v in kw.items()}
        return model(torch.tensor(tokens), **kw).logits.float().numpy()


def _ours(model, params, tokens, **kw):
    return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), **kw), np.float32)


KINDS = ["gpt2", "llama", "llama_tied"]


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(ckpt, kind):
    path, ref = ckpt(kind)
    model, params = hf.load_pretrained(path)
    assert model.cfg.tie_embeddings == (kind != "llama")
    if kind != "gpt2":
        assert model.cfg.rope_theta == 500000.0 and model.cfg.num_kv_heads == 2
    tokens = _tokens()
    want = _hf_logits(ref, tokens)
    assert want.std() > 0.3  # not a vacuous comparison
    np.testing.assert_allclose(_ours(model, params, tokens), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_left_padding_matches_transformers_attention_mask(ckpt, kind):
    path, ref = ckpt(kind)
    model, params = hf.load_pretrained(path)
    tokens = _tokens(1, b=3)
    mask = np.ones_like(tokens)
    mask[0, :5], mask[1, :1] = 0, 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want = _hf_logits(ref, tokens, attention_mask=mask, position_ids=positions)
    got = _ours(model, params, tokens, positions=jnp.asarray(positions), segment_ids=jnp.asarray(mask))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=1e-4, rtol=0)


def test_sharded_index_loads_like_single_file(ckpt, tmp_path):
    path, ref = ckpt("llama")
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _, want = hf.load_pretrained(path)
    _, got = hf.load_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers_and_round_trips(ckpt, kind, tmp_path):
    path, ref = ckpt(kind)
    model, params = hf.load_pretrained(path)
    hf.save_pretrained(model, params, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(ref)
    tokens = _tokens(2)
    np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(ref, tokens))
    model2, params2 = hf.load_pretrained(tmp_path)
    assert model2.cfg == model.cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bf16_checkpoint(ckpt, tmp_path):
    ref = _hf_model("llama", torch.bfloat16)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model, params = hf.load_pretrained(tmp_path)  # upcast on load: exactly the bf16 values
    # (not ref.float(): .to(bfloat16) also rounded the rotary inv_freq buffer; a fresh float32 load does not)
    ref32 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(3)
    np.testing.assert_allclose(_ours(model, params, tokens), _hf_logits(ref32, tokens), atol=1e-4, rtol=0)

    model, params = hf.load_pretrained(tmp_path, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    assert model.cfg.dtype == "bfloat16"
    hf.save_pretrained(model, params, tmp_path / "out")  # bf16 out, bit-identical to what came in
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
        assert torch.equal(a, b), name


def test_scalar_head_exports_trunk_and_score_head(ckpt, tmp_path):
    path, ref = ckpt("llama")
    lm, lm_params = hf.load_pretrained(path)
    rm = Transformer(lm.cfg, head="scalar")
    rng = np.random.RandomState(0)
    head = {"kernel": rng.normal(size=(64, 1)).astype(np.float32), "bias": np.array([0.3], np.float32)}
    params = {k: v for k, v in lm_params.items() if k != "lm_head"} | {"scalar_head": head}
    with pytest.raises(ValueError, match="trunk_only=True"):
        hf.save_pretrained(rm, params, tmp_path)
    hf.save_pretrained(rm, params, tmp_path, trunk_only=True)

    base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(base).__name__ == "LlamaModel"
    score = {k: torch.tensor(v) for k, v in load_file(tmp_path / hf.SCORE_FILE).items()}
    tokens = _tokens(4)
    with torch.no_grad():
        want = (base(torch.tensor(tokens)).last_hidden_state @ score["score.weight"].T + score["score.bias"])[..., 0]
    np.testing.assert_allclose(_ours(rm, params, tokens), want.numpy(), atol=1e-4, rtol=0)

    rm2, params2 = hf.load_pretrained(tmp_path, head="scalar")
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_model_config_dict_matches_config_model_keys(ckpt):
    from instructgpt_jax import config_lib
    path, _ = ckpt("llama")
    d = hf.model_config_dict(path)
    config = config_lib.model_config("tiny")
    config.update(d)  # a stage sets config.model from a checkpoint this way
    assert config.arch == "llama" and config.num_kv_heads == 2 and config.rope_theta == 500000.0
    assert set(d) <= set(config.keys())


# --------------------------------------------------------------------------- bad input


def _copy(ckpt, kind, tmp_path):
    path, _ = ckpt(kind)
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_unsupported_architecture(ckpt, tmp_path):
    path = _copy(ckpt, "gpt2", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(architectures=["BertForMaskedLM"], model_type="bert")
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="BertForMaskedLM.*supported: GPT2LMHeadModel.*LlamaForCausalLM.*"
                                         "GPTNeoXForCausalLM"):
        hf.load_pretrained(path)


def test_unsupported_feature_names_key(ckpt, tmp_path):
    path = _copy(ckpt, "llama", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope_parameters.rope_type='yarn' is not supported; valid: default, llama3"):
        hf.load_pretrained(path)


def test_missing_and_unexpected_tensors_are_named(ckpt, tmp_path):
    path = _copy(ckpt, "gpt2", tmp_path)

    def edit(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        t["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
    _edit_tensors(path, edit)
    with pytest.raises(ValueError, match=r"missing tensors \['transformer.h.1.mlp.c_fc.bias'\], "
                                         r"unexpected tensors \['transformer.h.0.extra.weight'\]"):
        hf.load_pretrained(path)


def test_shape_mismatch_names_tensor_and_shapes(ckpt, tmp_path):
    path = _copy(ckpt, "llama", tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(64, 64\), "
                                         r"expected \(32, 64\)"):
        hf.load_pretrained(path)


def test_pickle_checkpoints_are_refused(ckpt, tmp_path):
    path = _copy(ckpt, "gpt2", tmp_path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never unpickled.*safetensors"):
        hf.load_pretrained(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_pretrained(path)


def test_load_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        hf.load_tokenizer(tmp_path)
    from instructgpt_jax.data.tokenizer import Tokenizer, train_tokenizer
    train_tokenizer(["a b c d e f g"] * 50, str(tmp_path / "tokenizer.model"), 300)
    tok = hf.load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.eos_id == 3 and tok.pad_id == 0


# --------------------------------------------------------------------------- sharded load


def test_load_into_a_4_device_mesh(ckpt):
    """fsdp=2 x tensor=2 on simulated CPU devices: each device gets its own slice of every tensor."""
    paths = [str(ckpt(kind)[0]) for kind in ("gpt2", "llama")]
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from instructgpt_jax import hf, sharding
        mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
        for path in {paths!r}:
            _, want = hf.load_pretrained(path)
            _, params = hf.load_pretrained(path, mesh=mesh)
            q = params["layers"]["attn"]["query"]["kernel"]  # [L, embed/fsdp, heads/tensor, head_dim]
            assert q.sharding.mesh.shape == mesh.shape and q.addressable_shards[0].data.shape == (2, 32, 2, 16)
            for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
                for shard in got.addressable_shards:
                    np.testing.assert_array_equal(shard.data, np.asarray(ref)[shard.index])
        print("ok")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
