"""SFT starts from a Hugging Face LLaMA directory (with its SentencePiece tokenizer.model) through the
normal stage entry point, and the result exports back to a directory transformers loads."""
import os
import shutil

import numpy as np
import pytest
from conftest import BUILTIN, stage_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from instructgpt_jax import checkpoints, hf, sft, train_lib  # noqa: E402
from instructgpt_jax.miniature import world as synthetic  # noqa: E402
from instructgpt_jax.data.tokenizer import train_tokenizer  # noqa: E402


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_sft_from_hf_llama_and_back(tmp_path):
    tok = train_tokenizer([r["text"] for r in synthetic.pretraining(500, 0)], str(tmp_path / "sp.model"), 400)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=tok.vocab_size, max_position_embeddings=128)
    hf_dir = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir, safe_serialization=True)
    shutil.copy(tok.path, hf_dir / "tokenizer.model")

    workdir = str(tmp_path / "sft")
    config = stage_config("sft", **{"init.hf_path": str(hf_dir), "train.num_steps": 3, "model.preset": "tiny"})
    sft.train(config, workdir, builtin_data=BUILTIN)
    meta = checkpoints.read_export_meta(workdir)
    assert meta["model"]["arch"] == "llama" and meta["model"]["num_kv_heads"] == 2
    assert np.isfinite(train_lib.read_metrics(workdir)[-1]["loss"])
    # the tokenizer came from the checkpoint directory
    assert open(os.path.join(workdir, "export", "tokenizer.model"), "rb").read() == open(tok.path, "rb").read()

    model, _ = hf.load_pretrained(hf_dir)
    from instructgpt_jax import sharding
    shapes, shards = sharding.param_shardings(lambda r: model.init(r, np.zeros((1, 4), np.int32))["params"],
                                              sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}))
    params = checkpoints.load_export(workdir, checkpoints.abstract_like(shapes, shards))
    out = tmp_path / "out"
    hf.save_pretrained(model, params, out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.array([tok.encode("Q: reverse: cat dog\nA:")])
    with torch.no_grad():
        theirs = back(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, tokens))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_gpt2_without_sentencepiece_is_a_clear_error(tmp_path):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    with pytest.raises(ValueError, match="config.data.tokenizer"):
        sft.train(stage_config("sft", **{"init.hf_path": str(tmp_path / "gpt2")}), str(tmp_path / "w"),
                  builtin_data=BUILTIN)
