"""Real checkpoints end to end: Hugging Face directories shaped like Llama-2, GPT-2, Llama-3,
Qwen2.5, Qwen3, Gemma and Pythia checkpoints (random tiny `transformers` weights, each family's kind of
tokenizer with its special ids and chat template, built here: no downloads) train through SFT on chat
data, export with `python -m instructgpt_jax.hf --export` to directories that `AutoModelForCausalLM` /
`AutoTokenizer` load with our logits and our ids; the Qwen-shaped one goes SFT -> RM (HH-style and
UltraFeedback-style files) -> PPO through the command line, and its reward model exports as an
`AutoModelForSequenceClassification` giving our rewards.

Time: the command line (subprocesses) runs for Qwen2.5 (the whole chain), Llama-2 and GPT-2; the other
families run the same SFT stage and export in-process (`sft.train`, `hf.export_stage`), which skips a
Python + JAX start per run. One SFT per family, shared by every test (module fixtures).
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ROOT, stage_config  # noqa: E402
from test_tokenizers import CORPUS, _added, _write, make_bpe, make_llama2  # noqa: E402

from instructgpt_jax import checkpoints, hf, sharding, sft, train_lib  # noqa: E402
from instructgpt_jax.data import chat  # noqa: E402
from instructgpt_jax.data.tokenizer import load_tokenizer  # noqa: E402
from instructgpt_jax.models import ModelConfig, Transformer  # noqa: E402

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# GPT-2 has no chat tokens, so built-in 'chatml' is refused there (<|im_end|> is no special token of it: sampling
# could never stop); ChatML whose turns end with {{ eos_token }} (<|endoftext|>) works.
CHATML_EOS = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SMALL = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
             initializer_range=0.1, max_position_embeddings=128)
CLI = ("qwen2.5", "llama2", "gpt2")  # through the command line; the others in-process
FAMILIES = ("qwen2.5", "llama2", "gpt2", "llama3", "qwen3", "gemma", "pythia")
DEFAULT = ("qwen2.5",)  # in the default suite (the others: `pytest -m slow`)
_w = CORPUS
CONVS = [[{"role": "user", "content": _w[i]}, {"role": "assistant", "content": _w[i + 1]},
          {"role": "user", "content": _w[i + 2][:30]}, {"role": "assistant", "content": _w[i + 3][:40]}]
         for i in range(0, 160, 4)]
TEXTS = ["the cat sat on a mat", "while 12 dogs ran  past\nquickly", "héllo wörld naïve café 你好", "a"]


def make_gemma(d):
    """SentencePiece BPE with Gemma's ids (pad 0, eos 1, bos 2, unk 3, <mask> 4) and its turn tokens, no dummy
    prefix, byte fallback; GemmaTokenizer config and Gemma's chat template."""
    os.makedirs(d, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(buf.getvalue())
    specials = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<start_of_turn>": 5, "<end_of_turn>": 6}
    _write(d, "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "tokenizer_class": "GemmaTokenizer", "sp_model_kwargs": {},
        "clean_up_tokenization_spaces": False, "added_tokens_decoder": _added(specials),
        "chat_template": GEMMA_TEMPLATE})
    _write(d, "generation_config.json", {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0})
    return d


def make_pythia(d):
    """GPT-NeoX's byte-level BPE: <|endoftext|> (id 0) is BOS, EOS and UNK, <|padding|> (id 1) the pad."""
    from tokenizers import Tokenizer as TK, decoders, models, pre_tokenizers, processors, trainers
    os.makedirs(d, exist_ok=True)
    tk = TK(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(os.path.join(d, "tokenizer.json"))
    _write(d, "tokenizer_config.json", {
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|padding|>", "add_prefix_space": False, "tokenizer_class": "GPTNeoXTokenizer",
        "added_tokens_decoder": _added({"<|endoftext|>": 0, "<|padding|>": 1})})
    return d


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def make_qwen(d):
    """Qwen2's byte-level BPE: NFC, one digit per pre-token (what transformers' Qwen2Tokenizer builds)."""
    make_bpe(d, "qwen2")
    path = os.path.join(d, "tokenizer.json")
    tj = json.load(open(path, encoding="utf-8"))
    tj["normalizer"] = {"type": "NFC"}
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": QWEN_SPLIT}
    json.dump(tj, open(path, "w", encoding="utf-8"), ensure_ascii=False)
    return d


def make_tokenizer(d, family):
    if family == "llama2":
        return make_llama2(d)
    if family == "gemma":
        return make_gemma(d)
    if family == "pythia":
        return make_pythia(d)
    if family in ("qwen2.5", "qwen3"):
        return make_qwen(d)
    return make_bpe(d, family)[0]


def hf_config(family, vocab):
    t = transformers
    if family == "gpt2":
        return t.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=vocab, initializer_range=0.1)
    kw = dict(SMALL, vocab_size=vocab)
    if family in ("llama2", "llama3"):
        return t.LlamaConfig(**kw, num_key_value_heads=2, rope_theta=500000.0 if family == "llama3" else 10000.0)
    if family == "qwen2.5":  # q/k/v biases, tied head, an embedding table padded past the tokenizer (as Qwen's)
        return t.Qwen2Config(**dict(kw, vocab_size=vocab + 13), num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen3":
        return t.Qwen3Config(**kw, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    if family == "gemma":
        return t.GemmaConfig(**kw, num_key_value_heads=1, head_dim=16)
    return t.GPTNeoXConfig(**kw, rotary_pct=0.25, use_parallel_residual=True)


def make_checkpoint(d, family):
    """A tiny random `family` checkpoint with its tokenizer in directory d."""
    make_tokenizer(d, family)
    vocab = load_tokenizer(d).vocab_size
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, vocab)).eval()
    with torch.no_grad():  # biases 0 and norms 1 at init would hide a wrong mapping
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)
    return d


def run_cli(module, *args, check=True):
    """python -m module args... in the repository root; returns the CompletedProcess."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


SFT_KEYS = {"train.num_steps": 2, "train.batch_size": 4, "data.seq_len": 64, "data.max_prompt_len": 32,
            "data.max_response_len": 32, "train.eval_every": 0, "train.eval_batches": 1, "train.log_every": 1,
            "train.checkpoint_every": 100, "train.progress": False}


def flags(keys: dict) -> list:
    return [f"--config.{k}={v}" for k, v in keys.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small files in the public shapes: chat demonstrations, HH transcripts, UltraFeedback, chat prompts."""
    root = tmp_path_factory.mktemp("data")
    rows = {"chat.jsonl": [{"messages": c} for c in CONVS],
            "hh.jsonl": [{"chosen": f"\n\nHuman: {w}\n\nAssistant: {_w[i + 1]}",
                          "rejected": f"\n\nHuman: {w}\n\nAssistant: {_w[i + 2][:12]}"} for i, w in enumerate(_w[:40])],
            "uf.jsonl": [{"prompt": w, "completions": [{"response": _w[i + 1], "overall_score": 8.0},
                                                       {"response": _w[i + 2], "overall_score": 5.5},
                                                       {"response": _w[i + 3][:9], "overall_score": 2.0}]}
                         for i, w in enumerate(_w[:40])],
            "prompts.jsonl": [{"messages": c[:1]} for c in CONVS],
            "text.jsonl": [{"text": " ".join(_w[i:i + 6])} for i in range(0, 120, 3)]}
    for name, rs in rows.items():
        with open(root / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    return {k.split(".")[0]: str(root / k) for k in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """family -> dict(ckpt, sft (workdir), out (HF export)); each built on first use."""
    cache = {}

    def get(family):
        if family in cache:
            return cache[family]
        root = tmp_path_factory.mktemp(family.replace(".", ""))
        ckpt = make_checkpoint(str(root / "ckpt"), family)
        workdir, out = str(root / "sft"), str(root / "hf")
        keys = dict(SFT_KEYS, **{"init.hf_path": ckpt, "data.train": data["chat"]})
        if family in ("gpt2", "pythia"):  # base models without a template
            template = root / "chatml_eos.jinja"
            template.write_text(CHATML_EOS)
            keys["data.chat_template"] = str(template)
        if family in CLI:  # the checkpoint preset, with the steps and lengths of a test (float32: logit parity)
            run_cli("instructgpt_jax.main", "--config=sft:finetune", f"--workdir={workdir}",
                    *flags(dict(keys, **{"model.dtype": "float32"})))
            printed = run_cli("instructgpt_jax.hf", f"--export={workdir}", f"--out={out}").stdout
            assert "AutoModelForCausalLM" in printed
        else:
            sft.train(stage_config("sft", **keys), workdir)
            hf.export_stage(workdir, out)
        cache[family] = dict(ckpt=ckpt, sft=workdir, out=out, root=root)
        return cache[family]
    return get


def our_model(export):
    """(model, params) of one of our exports, as the stages load it."""
    meta = checkpoints.read_export_meta(export)
    model = Transformer(ModelConfig.from_config(meta["model"]), head="scalar" if "rm_bias" in meta else "lm")
    return model, checkpoints.load_params(export, model, sharding.default_mesh())


@pytest.mark.parametrize("family", [f if f in DEFAULT else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_sft_from_checkpoint_exports_what_transformers_loads(family, runs):
    r = runs(family)
    metrics = train_lib.read_metrics(r["sft"])
    assert len(metrics) >= 2 and all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    meta = checkpoints.read_export_meta(r["sft"])
    assert meta["model"]["arch"] == {"gpt2": "gpt", "pythia": "neox"}.get(family, "llama")

    # weights: transformers' logits on the export equal ours on our export
    model, params = our_model(os.path.join(r["sft"], "export"))
    back = transformers.AutoModelForCausalLM.from_pretrained(r["out"]).eval()
    assert type(back).__name__ == hf.FAMILIES[hf.hf_model_type(model.cfg)].lm
    tokens = np.random.RandomState(0).randint(0, load_tokenizer(r["ckpt"]).vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = back(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)), theirs, atol=1e-4, rtol=0)
    # ... and the training changed them (the export is not the checkpoint it started from)
    _, start = hf.load_pretrained(r["ckpt"])
    assert not np.allclose(np.asarray(start["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))

    # tokenizer: AutoTokenizer on the export gives our ids, and the checkpoint's own ids
    ours = load_tokenizer(os.path.join(r["sft"], "export"))
    theirs_tok = transformers.AutoTokenizer.from_pretrained(r["out"])
    original = transformers.AutoTokenizer.from_pretrained(r["ckpt"])
    for text in TEXTS:
        want = ours.encode(text)
        assert theirs_tok(text, add_special_tokens=False)["input_ids"] == want, text
        assert original(text, add_special_tokens=False)["input_ids"] == want, text
    # the chat template of the run, rendered by transformers, gives the ids SFT trained on
    template = chat.resolve(os.path.join(r["sft"], "export", "chat_template.jinja"), ours)
    conv = CONVS[3]
    ids, mask = chat.sft_ids(template, conv, ours)
    assert list(theirs_tok.apply_chat_template(conv, tokenize=True, return_dict=False)) == ids
    assert list(theirs_tok.apply_chat_template(conv[:3], tokenize=True, add_generation_prompt=True,
                                               return_dict=False)) == chat.prompt_ids(template, conv[:3], ours)
    assert 0 < sum(mask) < len(ids)
    if family not in ("gpt2", "pythia"):  # the checkpoint's own template was the default
        assert theirs_tok.chat_template == original.chat_template
    # generation stops at every EOS id, the primary first
    gen = json.load(open(os.path.join(r["out"], "generation_config.json")))
    assert gen["eos_token_id"][0] == ours.eos_id and set(gen["eos_token_id"]) == set(ours.eos_ids)
    assert gen["pad_token_id"] == ours.pad_id not in ours.eos_ids
    end = chat.end_of_turn_ids(template, ours)
    assert end <= ours.eos_ids  # the template's end of turn is an EOS


@pytest.mark.slow  # the command line through every stage
def test_qwen_sft_rm_ppo_ptx_dpo_grpo_through_the_command_line(runs, data):
    """A researcher's first real run: SFT from the checkpoint (`--config.init.hf_path` once, `sft:finetune`) ->
    RM on HH-style and on UltraFeedback-style files -> PPO-ptx -> DPO -> GRPO, each later stage on its `finetune`
    preset with only data paths and `--config.init.from_workdir` / `--config.ppo.rm_workdir` (the model, tokenizer
    and template come from the previous export), steps overridden; the exports load in transformers: the policy
    as AutoModelForCausalLM, the RM as AutoModelForSequenceClassification whose logits + reward_bias are our
    rewards."""
    r = runs("qwen2.5")
    root = r["root"]
    common = {"init.from_workdir": r["sft"], "train.progress": False, "train.eval_every": 0,
              "train.eval_batches": 1, "train.checkpoint_every": 100, "train.log_every": 1, "model.dtype": "float32"}
    pref_keys = dict(common, **{"train.num_steps": 2, "train.batch_size": 4})
    rm_keys = dict(pref_keys, **{"rm.bias_examples": 8})
    rms = {}
    for name in ("hh", "uf"):
        rms[name] = str(root / f"rm_{name}")
        run_cli("instructgpt_jax.main", "--config=rm:finetune", f"--workdir={rms[name]}",
                *flags(dict(rm_keys, **{"data.train": data[name]})))
        assert np.isfinite([m for m in train_lib.read_metrics(rms[name]) if "loss" in m][-1]["loss"])
    for name, path in rms.items():  # both files were read (HH transcripts -> pairs, UltraFeedback -> ranked sets)
        meta = checkpoints.read_export_meta(path)
        stats = meta["data_stats"]
        assert stats["examples"] > 0 and stats["skipped_no_untied_pair"] < stats["examples"], (name, stats)
        assert meta["model"]["d_model"] == SMALL["hidden_size"] and meta["model"]["preset"] == "checkpoint"
        saved = json.load(open(os.path.join(path, "config.json")))  # lengths measured on the data
        assert saved["data"]["seq_len"] % 64 == 0 and 0 < saved["data"]["seq_len"] <= SMALL["max_position_embeddings"]

    rl = {"ppo.rm_workdir": rms["hh"], "data.train": data["prompts"], "train.num_steps": 2, "train.batch_size": 4,
          "ppo.minibatch_size": 2, "ppo.max_new_tokens": 8}
    ppo = str(root / "ppo")
    run_cli("instructgpt_jax.main", "--config=ppo:finetune", f"--workdir={ppo}", *flags(dict(
        common, **rl, **{"ppo.ptx_coef": 1.0, "data.ptx": data["text"], "ppo.ptx_batch_size": 2})))
    ppo_metrics = train_lib.read_metrics(ppo)
    assert [m["step"] for m in ppo_metrics if "score" in m][-1] == 2 and "ptx_loss" in ppo_metrics[-1]
    dpo = str(root / "dpo")
    run_cli("instructgpt_jax.main", "--config=dpo:finetune", f"--workdir={dpo}",
            *flags(dict(pref_keys, **{"data.train": data["uf"]})))
    grpo = str(root / "grpo")
    run_cli("instructgpt_jax.main", "--config=grpo:finetune", f"--workdir={grpo}",
            *flags(dict(common, **rl, **{"ppo.group_size": 2})))
    for run in (dpo, grpo):
        assert checkpoints.read_export_meta(run)["model"]["d_model"] == SMALL["hidden_size"]

    for export in ("export", "export_ema"):
        out = str(root / f"hf_ppo_{export}")
        run_cli("instructgpt_jax.hf", f"--export={os.path.join(ppo, export)}", f"--out={out}")
        model, params = our_model(os.path.join(ppo, export))
        back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        tokens = np.arange(3, 27, dtype=np.int32)[None]
        with torch.no_grad():
            theirs = back(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens)), theirs, atol=1e-4, rtol=0)
        assert transformers.AutoTokenizer.from_pretrained(out).chat_template == chat.CHATML

    # the reward model: AutoModelForSequenceClassification + reward_bias = our reward
    from instructgpt_jax import scoring
    out = str(root / "hf_rm")
    printed = run_cli("instructgpt_jax.hf", f"--export={rms['uf']}", f"--out={out}").stdout
    assert "AutoModelForSequenceClassification" in printed
    cfg = json.load(open(os.path.join(out, "config.json")))
    rm = scoring.RewardModel.load(rms["uf"])
    assert cfg["rm_bias"] == pytest.approx(rm.bias) and cfg["architectures"] == ["Qwen2ForSequenceClassification"]
    tok = load_tokenizer(os.path.join(rms["uf"], "export"))
    template = chat.resolve(os.path.join(rms["uf"], "export", "chat_template.jinja"), tok)
    prompts, replies = [_w[1], _w[7]], [_w[2], _w[9][:20]]
    want = rm.score_texts(tok, prompts, replies, seq_len=64, max_prompt_len=32, chat_template=template)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for p, c, w in zip(prompts, replies, want):
        text = hf_tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                          tokenize=False)
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[:ids.index(hf_tok.convert_tokens_to_ids("<|im_end|>"), len(ids) - 4) + 1]  # cut after the turn
        with torch.no_grad():
            got = seq(torch.tensor([ids])).logits[0, 0].item() + cfg["reward_bias"]
        assert got == pytest.approx(float(w), abs=1e-4)
    assert "reward_bias" in open(os.path.join(out, "README.md")).read()


def test_export_errors_are_one_line(tmp_path, runs):
    r = runs("qwen2.5")
    out = run_cli("instructgpt_jax.hf", f"--export={tmp_path}", f"--out={tmp_path / 'x'}", check=False)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "meta.json" in out.stderr
    out = run_cli("instructgpt_jax.hf", f"--export={r['sft']}", check=False)
    assert out.returncode == 2 and "--out is required" in out.stderr and out.stderr.count("\n") == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        hf.export_stage(r["sft"], tmp_path / "full")


@pytest.mark.slow
def test_ppo_with_a_reward_model_of_another_tokenizer(runs, data, tmp_path):
    """A policy Qwen-shaped (byte-level BPE, ChatML), reward model Llama-2-shaped (SentencePiece,
    Llama-2 template). PPO decodes each response and re-encodes prompt + response with the RM's tokenizer and
    template; the value model starts from the policy (fresh scalar head)."""
    from instructgpt_jax import ppo, rm as rm_stage, scoring
    policy, other = runs("qwen2.5"), runs("llama2")
    rm_dir = str(tmp_path / "rm")
    rm_stage.train(stage_config("rm", **{
        "init.hf_path": other["ckpt"], "init.from_workdir": other["sft"], "data.train": data["uf"],
        "train.num_steps": 2, "train.batch_size": 4, "data.seq_len": 64, "data.max_prompt_len": 32,
        "rm.bias_examples": 8}), rm_dir)
    pol_tok = load_tokenizer(os.path.join(policy["sft"], "export"))
    rm = scoring.RewardModel.load(rm_dir)
    retok = scoring.Retokenizer.load(rm_dir, rm, pol_tok)
    assert retok is not None and retok.tokenizer.backend == "sentencepiece" and retok.chat_template is not None
    assert scoring.Retokenizer.load(rm_dir, rm, load_tokenizer(os.path.join(other["sft"], "export"))) is None

    # the rows it scores are the RM's own training format for the decoded texts
    conv = [{"role": "user", "content": _w[3]}]
    reply = _w[4]
    ids = pol_tok.encode(reply) + [pol_tok.eos_id, 5, 6]  # sampled EOS then junk after it
    prompts = {"prompt_text": np.array(["", _w[5]], object),
               "prompt_messages": np.array([json.dumps(conv), ""], object)}
    got = retok(pol_tok, prompts, np.array([ids, ids]), sharding.default_mesh())
    want = rm.score_texts(retok.tokenizer, ["", _w[5]], [reply, reply], messages=[conv, None], seq_len=64,
                          max_prompt_len=32, chat_template=retok.chat_template)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    rows = retok.rows(pol_tok, ["", _w[5]], [json.dumps(conv), ""], [ids, ids])
    assert rows["tokens"][0, 0] == retok.tokenizer.bos_id  # Llama-2's <s>, not a Qwen id
    assert retok.tokenizer.decode(rows["tokens"][1]).rstrip().endswith(reply.strip())  # the template adds " " + EOS

    ppo_dir = str(tmp_path / "ppo")
    last = ppo.train(stage_config("ppo", **{
        "init.hf_path": policy["ckpt"], "init.from_workdir": policy["sft"], "ppo.rm_workdir": rm_dir,
        "data.train": data["prompts"], "train.num_steps": 2, "train.batch_size": 4, "ppo.minibatch_size": 2,
        "ppo.max_new_tokens": 8, "data.max_prompt_len": 24}), ppo_dir)
    assert np.isfinite(last["score"]) and np.isfinite(last["value_loss"])
