"""Scoring with an exported reward model: `python -m instructgpt_jax.hf --score` (JAX) and the `transformers`
snippet the export's README.md holds both read the reward at the reply's closing token and add the bias, and
agree; the obvious `apply_chat_template` + forward pass reads it at the newline the template adds after that token
and gives another number.

Three reward models: a Qwen2-shaped one (byte-level BPE, ChatML whose turns end '<|im_end|>\\n'; random tiny
weights, exported without training), the session's tiny RM (SentencePiece, no template: BOS + prompt + response +
EOS) and that RM with a template that writes no BOS where the tokenizer adds one (the snippet puts it back).
"""
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import BUILTIN  # noqa: E402
from test_hf_e2e import CHATML_EOS, CONVS, _w, make_checkpoint, run_cli  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from instructgpt_jax import checkpoints, hf, scoring  # noqa: E402
from instructgpt_jax.data import chat, prepare  # noqa: E402
from instructgpt_jax.data.tokenizer import load_tokenizer  # noqa: E402
from instructgpt_jax.models import Transformer  # noqa: E402

CHAT_ROWS = ([{"messages": c} for c in CONVS[:3]]  # two exchanges each: the second reply is scored
             + [{"messages": CONVS[5][:2]}, {"prompt": _w[40], "response": _w[41][:50], "id": 7},
                {"prompt": _w[42][:20], "response": _w[43]}])
DEMOS = BUILTIN("demonstrations", 6, 0, "train")  # the tiny RM's own kind of text
PLAIN_ROWS = DEMOS[:4] + [{"prompt": "Q: add: 3 + 4\nA:", "response": "7", "id": 3}]
_turns = lambda d: [{"role": "user", "content": d["prompt"]}, {"role": "assistant", "content": d["response"]}]  # noqa
WORLD_CHATS = [{"messages": _turns(DEMOS[0]) + _turns(DEMOS[1])}, {"messages": _turns(DEMOS[2])}, DEMOS[5]]


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _messages(row):
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _snippet(out, monkeypatch):
    """The README's ```python block, run in the export directory: its `reward` function."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(out)
    namespace = {}
    exec(code, namespace)
    return namespace["reward"]


def _score_cli(model, data, *extra):
    """--score through the command line -> (rewards, output rows, stderr)."""
    res = run_cli("instructgpt_jax.hf", "--score", f"--model={model}", f"--data={data}", *extra)
    lines = res.stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    return np.array([r["reward"] for r in rows]), rows, res.stderr


@pytest.fixture(scope="module")
def qwen_rm(tmp_path_factory):
    """An RM stage workdir shaped like one trained from a Qwen2 checkpoint (its random trunk, a random scalar
    head, rm_bias -0.25, its tokenizer and ChatML template), and its `hf --export` directory."""
    root = tmp_path_factory.mktemp("qwen_rm")
    ckpt = make_checkpoint(str(root / "ckpt"), "qwen2.5")
    lm, lm_params = hf.load_pretrained(ckpt)
    rng = np.random.RandomState(0)
    head = {"kernel": jnp.asarray(rng.normal(size=(lm.cfg.d_model, 1)), jnp.float32),
            "bias": jnp.asarray([0.3], jnp.float32)}
    params = {k: v for k, v in lm_params.items() if k != "lm_head"} | {"scalar_head": head}
    tok = load_tokenizer(ckpt)
    template = chat.resolve("auto", tok)
    assert template is not None and template.source == chat.CHATML
    workdir = root / "rm"
    checkpoints.export(str(workdir), params, {"stage": "rm", "model": dataclasses.asdict(lm.cfg), "rm_bias": -0.25},
                       save_tokenizer=lambda d: prepare.save_tokenizer(d, tok, template))
    out = root / "hf"
    hf.export_stage(workdir, out)
    return workdir, out


@pytest.fixture(scope="module")
def plain_rm(rm_workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_rm") / "hf"
    hf.export_stage(rm_workdir, out)
    return rm_workdir, out


def test_chat_rm_score_and_readme_snippet_agree_and_differ_from_naive(qwen_rm, tmp_path, monkeypatch):
    workdir, out = qwen_rm
    cfg = json.loads((out / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert cfg["reward_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg["reward_bias"] == pytest.approx(0.3 - 0.25)
    readme = (out / "README.md").read_text()
    assert "the template adds '\\n' after it" in readme and "[tok.bos_token_id]" not in readme

    got, rows, err = _score_cli(out, _write_jsonl(tmp_path / "rows.jsonl", CHAT_ROWS))
    assert rows == [dict(r, reward=pytest.approx(x)) for r, x in zip(CHAT_ROWS, got)]  # input fields kept
    summary = re.search(r"scored (\d+) rows .* mean reward (\S+)", err)
    assert int(summary[1]) == len(CHAT_ROWS) and float(summary[2]) == pytest.approx(got.mean(), abs=1e-5)

    # the same from the stage workdir, from the function, and from the training rows' own scorer
    np.testing.assert_allclose(hf.score_conversations(workdir, CHAT_ROWS, batch_size=4), got, atol=1e-5)
    rm = scoring.RewardModel.load(str(workdir))
    ours = load_tokenizer(os.path.join(workdir, "export"))
    template = chat.resolve(os.path.join(workdir, "export", prepare.TEMPLATE_FILE), ours)
    before = [r["messages"][:-1] if "messages" in r else None for r in CHAT_ROWS]
    replies = [_messages(r)[-1]["content"] for r in CHAT_ROWS]
    want = rm.score_texts(ours, [r.get("prompt", "") for r in CHAT_ROWS], replies, messages=before, seq_len=128,
                          max_prompt_len=127, chat_template=template)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # a row longer than max_len (128) is cropped as training crops: the prompt to 64 tokens, then the reply
    long = {"prompt": " ".join(_w[:20]), "response": " ".join(_w[20:40])}
    want = rm.score_texts(ours, [long["prompt"]], [long["response"]], seq_len=128, max_prompt_len=64,
                          chat_template=template)
    np.testing.assert_allclose(hf.score_conversations(out, [long]), want, atol=1e-5)

    reward = _snippet(out, monkeypatch)
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    for row, x in zip(CHAT_ROWS, got):
        messages = _messages(row)
        assert reward(messages) == pytest.approx(float(x), abs=1e-4)
        naive_ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=False))
        assert tok.decode(naive_ids[-2:]) == "<|im_end|>\n"  # the template goes on after the reply's end of turn
        with torch.no_grad():
            naive = seq(torch.tensor([naive_ids])).logits[0, 0].item() + cfg["reward_bias"]
        assert abs(naive - x) > 1e-3, row


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_plain_rm_score_and_readme_snippet_agree(plain_rm, tmp_path, monkeypatch):
    workdir, out = plain_rm
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "chat_template.jinja").exists()
    data = _write_jsonl(tmp_path / "rows.jsonl", PLAIN_ROWS)
    got, rows, _ = _score_cli(workdir, data, "--batch_size=2")  # the stage workdir, three batches
    assert len(rows) == len(PLAIN_ROWS) and rows[-1]["id"] == 3

    res_file = tmp_path / "scored.jsonl"
    run_cli("instructgpt_jax.hf", "--score", f"--model={out}", f"--data={data}", f"--out={res_file}")
    from_export = [json.loads(line)["reward"] for line in res_file.read_text().splitlines()]
    np.testing.assert_allclose(from_export, got, atol=1e-5)

    rm = scoring.RewardModel.load(workdir)  # what training and PPO read
    want = rm.score_texts(load_tokenizer(os.path.join(workdir, "export")), [r["prompt"] for r in PLAIN_ROWS],
                          [r["response"] for r in PLAIN_ROWS], seq_len=48, max_prompt_len=24)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert abs(got.mean()) < 3 and got.std() > 0

    reward = _snippet(out, monkeypatch)
    np.testing.assert_allclose([reward(r["prompt"], r["response"]) for r in PLAIN_ROWS], got, atol=1e-4)

    # Parquet rows score the same
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(PLAIN_ROWS), tmp_path / "rows.parquet")
    rows, where = hf.read_scoring_file(tmp_path / "rows.parquet")
    assert where[1].endswith("rows.parquet:row 1")
    np.testing.assert_allclose(hf.score_conversations(out, rows, where=where), got, atol=1e-5)


def test_template_without_bos_gets_the_bos_training_added(rm_workdir, tmp_path, monkeypatch):
    """The tiny RM's tokenizer adds BOS; a template that does not write one was trained with it in front."""
    workdir = tmp_path / "rm"
    shutil.copytree(os.path.join(rm_workdir, "export"), workdir / "export")
    (workdir / "export" / prepare.TEMPLATE_FILE).write_text(CHATML_EOS)
    out = tmp_path / "hf"
    hf.export_stage(workdir, out)
    assert "ids = [tok.bos_token_id] + tok(" in (out / "README.md").read_text()
    got = hf.score_conversations(out, WORLD_CHATS)
    np.testing.assert_allclose(hf.score_conversations(workdir, WORLD_CHATS), got, atol=1e-5)
    reward = _snippet(out, monkeypatch)
    np.testing.assert_allclose([reward(_messages(r)) for r in WORLD_CHATS], got, atol=1e-4)


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_score_errors_are_one_line(plain_rm, qwen_rm, sft_workdir, tmp_path):
    rm_workdir, _ = plain_rm
    _, chat_out = qwen_rm
    good = _write_jsonl(tmp_path / "good.jsonl", PLAIN_ROWS[:1])
    no_reply = _write_jsonl(tmp_path / "no_reply.jsonl", [PLAIN_ROWS[0], {"prompt": "hi"}])
    user_last = _write_jsonl(tmp_path / "user_last.jsonl", [{"messages": CONVS[0][:3]}])
    lm_dir = tmp_path / "lm"  # a Hugging Face LM directory: no reward model
    lm_dir.mkdir()
    shutil.copy(chat_out / "config.json", lm_dir / "config.json")
    cfg = json.loads((lm_dir / "config.json").read_text())
    del cfg["rm_bias"]
    (lm_dir / "config.json").write_text(json.dumps(cfg))
    cases = [
        ([f"--model={rm_workdir}", f"--data={tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file"),
        ([f"--model={rm_workdir}", f"--data={no_reply}"], "no_reply.jsonl:2: missing field 'response'"),
        ([f"--model={chat_out}", f"--data={user_last}"], "user_last.jsonl:1: the last turn of 'messages' must be"),
        ([f"--model={sft_workdir}", f"--data={good}"], "is a 'sft' export, not a reward model"),
        ([f"--model={lm_dir}", f"--data={good}"], "is not a reward model exported by instructgpt_jax"),
        ([f"--model={rm_workdir}", f"--data={_write_jsonl(tmp_path / 'chat.jsonl', CHAT_ROWS[:1])}"],
         "chat.jsonl:1: a conversation ('messages'), but this reward model was trained without a chat template"),
        ([f"--data={good}"], "--model is required with --score"),
    ]
    for args, message in cases:
        res = run_cli("instructgpt_jax.hf", "--score", *args, check=False)
        assert res.returncode == 2 and res.stdout == "", (args, res.stderr[-2000:])
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, (args, res.stderr[-2000:])
        assert message in res.stderr, (args, res.stderr)
