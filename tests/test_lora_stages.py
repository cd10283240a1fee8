"""LoRA through the stages on a Hugging Face Llama-architecture checkpoint (random weights, SentencePiece
tokenizer): SFT with adapters on every linear layer -> `hf --adapter` loads in peft with our logits, the
merged export loads in transformers, `config.init.adapter` starts a run from that PEFT adapter; then DPO,
and PPO-ptx with an NF4 base (reward model and value model sharing one trunk), resumed exactly."""
import gc
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import BUILTIN, ROOT, ppo_interrupted_then_resumed, stage_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from instructgpt_jax import checkpoints, dpo, hf, ppo, rm, sft, train_lib  # noqa: E402
from instructgpt_jax.data.tokenizer import train_tokenizer  # noqa: E402
from instructgpt_jax.miniature import world as synthetic  # noqa: E402

pytestmark = pytest.mark.slow  # stage runs on a checkpoint: `pytest -m slow` (CI runs it)
LORA = {"lora.rank": 16, "lora.alpha": 32.0, "lora.targets": "all-linear"}
PROMPT = "Q: reverse: cat dog\nA:"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tok = train_tokenizer([r["text"] for r in synthetic.pretraining(500, 0)], str(d / "sp.model"), 400)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf", safe_serialization=True)
    shutil.copy(tok.path, d / "hf" / "tokenizer.model")
    return d / "hf", tok


@pytest.fixture(scope="module")
def lora_sft(llama, tmp_path_factory):
    hf_dir, _ = llama
    workdir = str(tmp_path_factory.mktemp("sft_lora"))
    config = stage_config("sft", **{"init.hf_path": str(hf_dir), "train.num_steps": 6, "model.preset": "tiny", **LORA,
                                    "optim.warmup_steps": 0})
    sft.train(config, workdir, builtin_data=BUILTIN)
    return workdir


def _cli(*args):
    out = subprocess.run([sys.executable, "-m", "instructgpt_jax.hf", *args], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def _logits(model, tok, text=PROMPT):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)])).logits.numpy()


def test_peft_adapter_and_merged_export_give_our_logits(llama, lora_sft, tmp_path):
    hf_dir, tok = llama
    _cli(f"--export={lora_sft}", f"--out={tmp_path / 'adapter'}", "--adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32.0 and config["base_model_name_or_path"] == str(hf_dir)
    _cli(f"--export={lora_sft}", f"--out={tmp_path / 'merged'}")

    # ours: the merged export through our model
    from instructgpt_jax import sharding
    from instructgpt_jax.models import ModelConfig, Transformer
    meta = checkpoints.read_export_meta(lora_sft)
    model = Transformer(ModelConfig.from_config(meta["model"]))
    params = checkpoints.load_params(lora_sft, model, sharding.default_mesh())
    ours = np.asarray(model.apply({"params": params}, np.array([tok.encode(PROMPT)])))

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    before = _logits(base, tok)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_logits(adapted, tok), ours, atol=1e-4)
    assert np.abs(before - ours).max() > 1e-3  # the adapters changed the model (6 steps at lr 3e-3)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    np.testing.assert_allclose(_logits(merged, tok), ours, atol=1e-4)


def test_a_run_starts_from_a_peft_adapter(llama, lora_sft, tmp_path):
    """config.init.adapter: rank / alpha / targets come from the adapter; at lr 0 the run's merged export equals
    the adapter's source run's. Contradicting --config.lora keys and a non-adapter directory are one-line errors."""
    hf_dir, _ = llama
    _cli(f"--export={lora_sft}", f"--out={tmp_path / 'adapter'}", "--adapter")
    workdir = str(tmp_path / "again")
    config = stage_config("sft", **{"init.hf_path": str(hf_dir), "train.num_steps": 1, "model.preset": "tiny",
                                    "init.adapter": str(tmp_path / "adapter"), "optim.lr": 0.0})
    sft.train(config, workdir, builtin_data=BUILTIN)
    meta = checkpoints.read_export_meta(workdir)
    assert meta["lora"]["rank"] == 16 and meta["lora"]["alpha"] == 32.0
    assert meta["lora"]["targets"] == "q,k,v,o,gate,up,down"
    a, b = checkpoints.load_adapter(workdir), checkpoints.load_adapter(lora_sft)
    for x, y in zip(*(__import__("jax").tree.leaves(t) for t in (a, b))):
        np.testing.assert_allclose(x, y, atol=1e-7)

    from instructgpt_jax import harness
    from instructgpt_jax.errors import UserError
    with pytest.raises(UserError, match="contradicts the adapter"):
        harness.resolve(config_with(config, **{"lora.rank": 8}), explicit={"lora.rank"})
    with pytest.raises(UserError, match="PEFT adapter directory"):
        harness.resolve(config_with(config, **{"init.adapter": str(hf_dir)}))


def config_with(config, **keys):
    from instructgpt_jax import config_lib
    return config_lib.replace(config, **keys)


@pytest.fixture(scope="module")
def lora_rm(lora_sft, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("rm_lora"))
    rm.train(stage_config("rm", **{"init.from_workdir": lora_sft, "train.num_steps": 4, **LORA}), workdir,
             builtin_data=BUILTIN)
    return workdir


def test_dpo_with_lora_starts_at_the_reference(lora_sft, tmp_path):
    workdir = str(tmp_path / "dpo")
    dpo.train(stage_config("dpo", **{"init.from_workdir": lora_sft, **LORA, "train.log_every": 1}), workdir,
              builtin_data=BUILTIN)
    records = train_lib.read_metrics(workdir)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference (adapters off) at step 1
    assert records[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert np.isfinite(records[-1]["loss"]) and records[-1]["kl"] > 0
    assert checkpoints.read_export_meta(workdir)["lora"]["rank"] == 16


def _ppo_config(lora_sft, lora_rm, **keys):
    return stage_config("ppo", **{"init.from_workdir": lora_sft, "ppo.rm_workdir": lora_rm, "ppo.ptx_coef": 1.0,
                                  **LORA, "lora.base_dtype": "nf4", **keys})


def test_ppo_ptx_with_an_nf4_base_runs_and_resumes_exactly(lora_sft, lora_rm, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    ppo.train(_ppo_config(lora_sft, lora_rm), straight, builtin_data=BUILTIN)
    records = train_lib.read_metrics(straight)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # samples of the policy = reference at iteration 1
    for key in ("score", "pg_loss", "value_loss", "ptx_loss", "eval_score"):
        assert np.isfinite(records[-1][key]), key
    meta = checkpoints.read_export_meta(straight)
    assert meta["lora"]["base_dtype"] == "nf4"
    assert os.path.exists(os.path.join(straight, "export_ema", "adapter"))

    config = _ppo_config(lora_sft, lora_rm, **{"train.checkpoint_every": 1})
    workdir = str(tmp_path / "resumed")
    ppo_interrupted_then_resumed(config, workdir, monkeypatch)
    resumed = train_lib.read_metrics(workdir)
    for key in ("score", "kl", "pg_loss", "value_loss", "ptx_loss", "eval_score"):
        assert resumed[1][key] == pytest.approx(records[1][key], rel=1e-5, abs=1e-6), key


def test_ppo_with_a_verifier_and_lora_puts_the_value_head_on_the_policys_base(lora_sft, tmp_path):
    """No reward model: the value model is adapters + a fresh head on the SFT weights the policy's base holds."""
    workdir = str(tmp_path / "ppo_verifier")
    ppo.train(stage_config("ppo", **{"init.from_workdir": lora_sft, "ppo.reward": "verifier", "ppo.ptx_coef": 0.0,
                                     "ppo.verifier": "instructgpt_jax.miniature.world:verify", **LORA}), workdir,
              builtin_data=BUILTIN)
    records = train_lib.read_metrics(workdir)
    assert np.isfinite(records[-1]["value_loss"]) and records[-1]["value_grad_norm"] > 0


class _Started(Exception):
    pass


def _resident_bytes(config, workdir, monkeypatch):
    """Bytes of the jax arrays PPO holds when its loop starts (train state, frozen bases / copies, RM), by
    stopping it there: live arrays then minus live arrays before."""
    import jax

    def live():
        gc.collect()  # an earlier run's arrays in reference cycles must not be freed in between
        return sum(x.nbytes for x in jax.live_arrays())
    seen = {}

    def fit(**kw):
        seen["bytes"] = live()
        raise _Started
    before = live()
    monkeypatch.setattr(train_lib, "fit", fit)
    with pytest.raises(_Started):
        ppo.train(config, workdir, builtin_data=BUILTIN)
    monkeypatch.undo()
    return seen["bytes"] - before


def test_ppo_ptx_with_qlora_holds_two_quantised_bases_and_small_trainables(lora_sft, lora_rm, tmp_path, monkeypatch):
    """On device: the NF4 policy base (= the reference) + the NF4 RM base (= the value trunk) + adapters with Adam
    and EMA, by hand; full fine-tuning holds five float32 models and two Adam states."""
    import jax

    from instructgpt_jax import lora, sharding
    from instructgpt_jax.models import ModelConfig, Transformer
    qlora = _resident_bytes(_ppo_config(lora_sft, lora_rm), str(tmp_path / "q"), monkeypatch)
    full = _resident_bytes(_ppo_config(lora_sft, lora_rm, **{"lora.rank": 0, "lora.base_dtype": "float32"}),
                           str(tmp_path / "f"), monkeypatch)
    mesh = sharding.default_mesh()
    cfg = ModelConfig.from_config(checkpoints.read_export_meta(lora_sft)["model"])
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    lm, rm_model = checkpoints.load_params(lora_sft, Transformer(cfg), mesh), \
        checkpoints.load_params(lora_rm, Transformer(cfg, head="scalar"), mesh)
    adapters = nbytes(lora.init_adapters(Transformer(dataclasses_replace(cfg, lora_rank=16)), jax.random.PRNGKey(0),
                                         mesh))
    head = nbytes(rm_model["scalar_head"])
    expected = (nbytes(lora.store_base(lm, "nf4")) + nbytes(lora.store_base(rm_model, "nf4"))
                + 4 * adapters + 3 * (adapters + head))  # policy (params, mu, nu, EMA); value (params, mu, nu)
    assert expected <= qlora <= expected * 1.02 + 4096, (qlora, expected)
    # policy, reference, EMA, policy Adam mu / nu (with the untied LM head); RM, value, value Adam mu / nu
    assert 5 * nbytes(lm) + 4 * nbytes(rm_model) <= full <= (5 * nbytes(lm) + 4 * nbytes(rm_model)) * 1.01
    assert qlora < full / 3  # at this size the float32 embeddings and LM head (never quantised) dominate


def dataclasses_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)
