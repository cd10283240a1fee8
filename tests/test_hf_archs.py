"""Hugging Face families in the one Transformer: Qwen2, Qwen3, Mistral (sliding window), Gemma, Gemma 2,
GPT-NeoX (parallel and sequential residual) and Llama-3 RoPE scaling.

Each family: a tiny random transformers model (float32, every weight and bias perturbed so that no
mapping hides behind zeros or ones) saved as safetensors once per module; our logits within 1e-4
of transformers', also with left padding; our export loads back in transformers with the same
logits; greedy KV-cache sampling equals a full recompute for a sliding-window and a soft-capped
family. One jitted forward per family at one shape [B, P + N], shared by every test.
"""
import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from instructgpt_jax import hf, sampling  # noqa: E402
from instructgpt_jax.models import ModelConfig, Transformer  # noqa: E402

V = 200
P, N = 12, 12  # prompt slots, sampled tokens; T = P + N is every forward's length
T = P + N
PAD_MASK = np.ones((3, T), np.int32)
PAD_MASK[0, :5], PAD_MASK[1, :1] = 0, 0  # left padding of 5 and 1 (row 2 none)
SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=V,
             initializer_range=0.1, max_position_embeddings=256)


def _config(kind):
    t = transformers
    if kind == "qwen2":  # q/k/v biases, tied head
        return t.Qwen2Config(**SMALL, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True)
    if kind == "qwen3":  # q/k norms, head_dim 32 != hidden / heads = 16
        return t.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    if kind == "mistral":  # every layer slides, window 5 < T
        return t.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=5)
    if kind == "gemma":  # multi-query, head_dim 16 (not derived), (1 + w) norms, GeGLU, sqrt(d) embedding scale
        return t.GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=16)
    if kind == "gemma2":  # layer 0 slides (window 6), layer 1 full; both soft-caps bite; scale 1/sqrt(24)
        return t.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=6,
                              query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if kind == "neox":  # parallel residual, a quarter of each head rotated, its own rotary base
        return t.GPTNeoXConfig(**SMALL, rotary_pct=0.25, rotary_emb_base=5000, use_parallel_residual=True)
    if kind == "neox_seq":
        return t.GPTNeoXConfig(**SMALL, rotary_pct=0.5, use_parallel_residual=False)
    if kind == "llama3":  # original context 64: long wavelengths stretched, middle ones interpolated
        return t.LlamaConfig(**SMALL, num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    raise KeyError(kind)


KINDS = ["qwen2", "qwen3", "mistral", "gemma", "gemma2", "neox", "neox_seq", "llama3"]
ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
         "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "neox": "GPTNeoXForCausalLM",
         "neox_seq": "GPTNeoXForCausalLM", "llama3": "LlamaForCausalLM"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """kind -> dict(path, ref (torch model), model, params, forward (jitted, [3, T]))."""
    cache = {}

    def get(kind):
        if kind not in cache:
            torch.manual_seed(0)
            ref = transformers.AutoModelForCausalLM.from_config(_config(kind)).eval()
            with torch.no_grad():  # biases 0 and norm weights 1 (or 0) at init would hide a wrong mapping
                for p in ref.parameters():
                    if p.ndim == 1:
                        p.add_(0.2 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(kind)
            ref.save_pretrained(path, safe_serialization=True)
            model, params = hf.load_pretrained(path)
            forward = jax.jit(lambda p, tokens, pos, seg: model.apply({"params": p}, tokens, pos, seg))
            cache[kind] = dict(path=path, ref=ref, model=model, params=params, forward=forward)
        return cache[kind]
    return get


def _tokens(seed):
    return np.random.RandomState(seed).randint(0, V, (3, T)).astype(np.int32)


def _hf_logits(model, tokens, **kw):
    with torch.no_grad():
        kw = {k: torch.tensor(v) for k, v in kw.items()}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def _ours(f, tokens, mask=None):
    mask = np.ones_like(tokens) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return np.asarray(f["forward"](f["params"], tokens, positions, mask))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(family, kind):
    f = family(kind)
    tokens = _tokens(0)
    want = _hf_logits(f["ref"], tokens)
    assert want.std() > 0.3  # not a vacuous comparison
    np.testing.assert_allclose(_ours(f, tokens), want, atol=1e-4, rtol=0)

    # left padding: positions restart at each row's first real token, pads masked by segment id 0
    positions = np.maximum(np.cumsum(PAD_MASK, axis=1) - 1, 0)
    want = _hf_logits(f["ref"], tokens, attention_mask=PAD_MASK, position_ids=positions)
    got = _ours(f, tokens, PAD_MASK)
    np.testing.assert_allclose(got[PAD_MASK == 1], want[PAD_MASK == 1], atol=1e-4, rtol=0)


def test_config_keys_read_from_each_family(family):
    cfgs = {kind: family(kind)["model"].cfg for kind in KINDS}
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings and cfgs["qwen2"].rope_theta == 1e6
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32 and not cfgs["qwen3"].tie_embeddings
    assert (cfgs["mistral"].sliding_window, cfgs["mistral"].layer_windows) == (5, (5, 5))
    g = cfgs["gemma"]
    assert (g.norm_unit_offset, g.embed_scale, g.activation, g.head_dim, g.num_kv_heads) == (True, True, "gelu_tanh",
                                                                                             16, 1)
    g2 = cfgs["gemma2"]
    assert g2.sandwich_norm and g2.layer_windows == (6, 0) and g2.sliding_pattern == "SF"
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar) == (2.0, 3.0, 24.0)
    n = cfgs["neox"]
    assert (n.arch, n.parallel_residual, n.rotary_pct, n.rotary_dim, n.rope_theta, n.activation) == (
        "neox", True, 0.25, 4, 5000.0, "gelu")
    assert not cfgs["neox_seq"].parallel_residual and cfgs["neox_seq"].rotary_dim == 8
    ll = cfgs["llama3"]
    assert (ll.rope_scaling, ll.rope_factor, ll.rope_original_max_len) == ("llama3", 8.0, 64)


def test_model_config_dict_resets_every_family_key_of_a_preset(family):
    """A stage does config.model.update(model_config_dict(path)): whatever preset it started from (here
    gemma2-2b and pythia-160m, far from every default), the result is the checkpoint's model."""
    from instructgpt_jax import config_lib
    for kind in KINDS:
        f = family(kind)
        for preset in ("gemma2-2b", "pythia-160m"):
            config = config_lib.model_config(preset)
            config.update(hf.model_config_dict(f["path"]))
            # logits_chunk and remat are runtime keys, the run's own (the preset's here)
            got = dataclasses.replace(ModelConfig.from_config(config), logits_chunk=0, remat="none")
            assert got == f["model"].cfg, (kind, preset)


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers_and_round_trips(family, kind, tmp_path):
    f = family(kind)
    hf.save_pretrained(f["model"], f["params"], tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [ARCHS[kind]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(f["ref"])
    tokens = _tokens(1)
    np.testing.assert_array_equal(_hf_logits(back, tokens), _hf_logits(f["ref"], tokens))
    model2, params2 = hf.load_pretrained(tmp_path)
    assert model2.cfg == f["model"].cfg
    jax.tree.map(np.testing.assert_array_equal, params2, f["params"])


@pytest.mark.parametrize("kind", ["neox", "gemma2"])  # own base-model prefix and head name; four norms
def test_trunk_only_export_is_the_base_model(family, kind, tmp_path):
    f = family(kind)
    rm = Transformer(f["model"].cfg, head="scalar")
    head = {"kernel": np.full((64, 1), 0.5, np.float32), "bias": np.array([0.3], np.float32)}
    params = {k: v for k, v in f["params"].items() if k != "lm_head"} | {"scalar_head": head}
    hf.save_pretrained(rm, params, tmp_path, trunk_only=True)
    base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(base).__name__ == {"neox": "GPTNeoXModel", "gemma2": "Gemma2Model"}[kind]
    want = f["ref"].base_model.state_dict()
    assert set(base.state_dict()) == set(want)
    for name, x in base.state_dict().items():
        assert torch.equal(x, want[name]), name
    _, params2 = hf.load_pretrained(tmp_path, head="scalar")
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("kind", ["mistral", "gemma2"])  # sliding window on every / alternating layers; soft-caps
def test_greedy_kv_cache_sampling_equals_full_recompute(family, kind):
    f = family(kind)
    mask = PAD_MASK[:, :P]
    prompts = np.where(mask == 1, _tokens(2)[:, :P], 0)
    sampler = sampling.make_sampler(f["model"], max_new_tokens=N, eos_id=V + 1, pad_id=0, greedy=True,
                                    return_logits=True)  # EOS never sampled: every row decodes N tokens
    out = jax.device_get(sampler(f["params"], prompts, mask, jax.random.PRNGKey(0)))
    full_mask = np.concatenate([mask, np.ones((3, N), np.int32)], axis=1)
    ref = _ours(f, out["tokens"], full_mask)[:, P - 1:-1]  # step i's logits come from slot P - 1 + i
    np.testing.assert_allclose(out["logits"], ref, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["response"], ref.argmax(-1))
    # the window is crossed: the last step's query is further than the window from the first prompt slot
    assert T - 1 > f["model"].cfg.sliding_window


# --------------------------------------------------------------------------- config.json mapping (no model)


def _llama_json(**kw):
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=V, num_hidden_layers=4,
                hidden_size=64, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256, **kw)


def test_unsupported_rope_type_names_key_and_valid_values():
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type='yarn' is not supported; valid: default, llama3"):
        hf.model_config_dict(_llama_json(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0)))
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='dynamic'.*valid: default, llama3"):  # < 5 spelling
        hf.model_config_dict(_llama_json(rope_theta=1e4, rope_scaling=dict(type="dynamic", factor=2.0)))
    old = hf.model_config_dict(_llama_json(rope_theta=5e5, rope_scaling=dict(
        rope_type="llama3", factor=32, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=8192)))
    assert (old["rope_theta"], old["rope_scaling"], old["rope_factor"]) == (5e5, "llama3", 32.0)


def test_sliding_layers_from_qwen_and_layer_types():
    qwen = dict(_llama_json(), architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=32,
                use_sliding_window=True, max_window_layers=3)
    d = hf.model_config_dict(qwen)
    assert (d["sliding_window"], d["sliding_pattern"]) == (32, "FFFS")  # layers from max_window_layers on slide
    assert ModelConfig(**d).layer_windows == (0, 0, 0, 32)
    assert hf.model_config_dict(dict(qwen, use_sliding_window=False))["sliding_window"] == 0
    gemma2 = dict(_llama_json(), architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=16,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    gemma2["num_hidden_layers"] = 6
    assert hf.model_config_dict(gemma2)["sliding_pattern"] == "SSF"
    with pytest.raises(ValueError, match="layer_types entry 'chunked_attention'"):
        hf.model_config_dict(dict(gemma2, layer_types=["chunked_attention"] * 6))
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        hf.model_config_dict(_llama_json(attention_bias=True))


def test_export_refuses_a_config_no_family_computes():
    with pytest.raises(ValueError, match="config.model.attn_softcap=5.0 has no Hugging Face 'llama' equivalent"):
        hf.hf_model_type(ModelConfig(arch="llama", attn_softcap=5.0))
    with pytest.raises(ValueError, match="sliding_pattern='SF'.*Mistral"):
        hf.hf_model_type(ModelConfig(arch="llama", sliding_window=8, sliding_pattern="SF"))
    assert hf.hf_model_type(ModelConfig(arch="llama", qkv_bias=True, sliding_window=8, sliding_pattern="FS")) == "qwen2"
