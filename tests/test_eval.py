"""lm-evaluation-harness on our models (`instructgpt_jax.eval`), checked against the harness's own `hf` backend
on the same weights: per-request log-likelihoods within 1e-4 (float32), identical accuracies, identical greedy
generations, identical perplexity windows; the command line on a stage's export; tasks during training.

The tasks are local (harness YAML + JSONL written here: a multiple-choice task, a generation task, a perplexity
task); nothing downloads anything."""
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import ROOT, stage_config  # noqa: E402
from test_hf_e2e import CHATML_EOS, make_checkpoint  # noqa: E402

from instructgpt_jax import eval as ev  # noqa: E402
from instructgpt_jax import hf, sharding, sft, train_lib  # noqa: E402

TASKS = ["tiny_mc", "tiny_gen", "tiny_txt"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A directory of three harness tasks over JSONL files, one per kind of request."""
    root = tmp_path_factory.mktemp("tasks")
    rows = {
        "mc": [{"question": f"Question {i}: the cat sat on the", "choices": ["mat", " dog ran", "while 12", "café"],
                "label": i % 4} for i in range(6)],
        "gen": [{"prompt": f"Say {w}:", "answer": w} for w in ["cat", "dog", "mat", "hello world"]],
        "txt": [{"text": "the cat sat on a mat. " * (k + 1) + "héllo"} for k in range(3)],
    }
    for name, rs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))

    def common(n):
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/{n}.jsonl\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: tiny_mc\n" + common("mc") + "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\nmetric_list:\n  - metric: acc\n"
        "  - metric: acc_norm\n")
    (root / "gen.yaml").write_text(
        "task: tiny_gen\n" + common("gen") + "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 12\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    (root / "txt.yaml").write_text(
        "task: tiny_txt\n" + common("txt") + "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\n"
        "doc_to_target: \"{{text}}\"\nmetric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return str(root)


def hf_backend(path, tasks, names=TASKS, **kw):
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={path},dtype=float32,max_length=128", device="cpu", batch_size=4,
        tasks=names, task_manager=ev.task_manager([tasks]), log_samples=True, bootstrap_iters=0, **kw)


def assert_same(ref, ours, names=TASKS):
    """The same requests, log-likelihoods within 1e-4, the same greedy flags, generations and metrics."""
    for t in names:
        a, b = ref["samples"][t], ours["samples"][t]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x["arguments"] == y["arguments"]
            for rx, ry in zip(x["resps"], y["resps"]):
                rx, ry = rx[0], ry[0]
                if isinstance(rx, str):  # generate_until
                    assert rx == ry
                elif isinstance(rx, tuple):  # loglikelihood: (logprob, is_greedy)
                    np.testing.assert_allclose(ry[0], rx[0], atol=1e-4, rtol=0)
                    assert ry[1] == rx[1]
                else:  # loglikelihood_rolling
                    np.testing.assert_allclose(ry, rx, atol=1e-4, rtol=0)
        for key, value in ref["results"][t].items():
            if isinstance(value, float):
                np.testing.assert_allclose(ours["results"][t][key], value, rtol=1e-5, err_msg=f"{t} {key}")
            elif key != "alias":
                assert ours["results"][t][key] == value, (t, key)


def test_bucket_brute_force():
    """The smallest of smallest x 2^k and 3/4 of it (k >= 1) that holds n, capped; never below n."""
    for smallest in (4, 16):
        sizes = sorted({smallest * 2 ** k for k in range(12)} | {smallest * 2 ** k * 3 // 4 for k in range(1, 12)})
        for cap in (16, 40, 128, 2048):
            for n in range(1, cap + 1):
                assert ev.bucket(n, cap, smallest) == max(n, min(cap, min(x for x in sizes if x >= n))), (n, cap)
    assert len({ev.bucket(n, 2048) for n in range(1, 2049)}) == 15  # 16 .. 2048: few shapes, few compilations


@pytest.mark.slow  # ~30 s per family; the lm-eval parity runs with the long tests
@pytest.mark.parametrize("family", ["qwen2.5", "llama2", "gemma", "gpt2"])
def test_backend_equals_the_hf_backend(family, tasks, tmp_path):
    """Byte-level BPE without BOS (Qwen), SentencePiece with BOS (Llama-2: the BOS rule, the prefix token of the
    rolling windows), Gemma's, GPT-2's learned positions."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), family)
    ours = ev.run_tasks(ev.JaxLM(hf_path=ckpt, batch_size=4, max_length=128), TASKS, include_path=[tasks],
                        log_samples=True)
    assert_same(hf_backend(ckpt, tasks), ours)


@pytest.mark.slow
def test_chat_template_requests_equal_the_hf_backend(tasks, tmp_path):
    """--apply_chat_template: the rendered contexts (the harness's samples' arguments) and their scores agree."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    names = ["tiny_mc", "tiny_gen"]
    ours = ev.run_tasks(ev.JaxLM(hf_path=ckpt, batch_size=4, max_length=128), names, include_path=[tasks],
                        log_samples=True, apply_chat_template=True)
    assert "<|im_start|>assistant\n" in ours["samples"]["tiny_mc"][0]["arguments"][0][0]
    assert_same(hf_backend(ckpt, tasks, names, apply_chat_template=True), ours, names)


@pytest.mark.slow
def test_continue_final_message_as_transformers(tmp_path):
    """A prefilled assistant turn is left open, as transformers' `continue_final_message`."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    lm = ev.JaxLM(hf_path=ckpt, batch_size=2, max_length=64)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    for msgs in ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}],
                 [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "trailing space "}]):
        want = tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
        assert lm.apply_chat_template(msgs, add_generation_prompt=False) == want
    want = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert lm.apply_chat_template(msgs[:1]) == want


@pytest.mark.slow
def test_generation_options(tmp_path):
    """`until` cuts the text; sampling follows the request's temperature (near 0: the greedy text) and the seed."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    lm = ev.JaxLM(hf_path=ckpt, batch_size=2, max_length=64)
    req = lambda ctx, **kw: types.SimpleNamespace(args=(ctx, dict(max_gen_toks=10, **kw)))  # noqa: E731
    ctxs = ["the cat sat", "while 12 dogs", "a"]
    greedy = lm.generate_until([req(c, do_sample=False, until=[]) for c in ctxs], disable_tqdm=True)
    assert all(len(g) > 0 for g in greedy)
    cut = greedy[0][len(greedy[0]) // 2:][:2]
    out = lm.generate_until([req(ctxs[0], do_sample=False, until=[cut])], disable_tqdm=True)
    assert out == [greedy[0].split(cut)[0]]
    cold = lm.generate_until([req(c, do_sample=True, temperature=1e-4, until=[]) for c in ctxs], disable_tqdm=True)
    assert cold == greedy
    hot = lambda seed: ev.JaxLM(hf_path=ckpt, batch_size=2, max_length=64, seed=seed).generate_until(  # noqa: E731
        [req(c, do_sample=True, temperature=2.0, until=[]) for c in ctxs * 2], disable_tqdm=True)
    a, b = hot(0), hot(1)
    assert a == hot(0) and a != b and a != greedy * 2


def run_eval(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "instructgpt_jax.eval", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_on_an_sft_export_equals_lm_eval_hf_on_its_export(tasks, tmp_path):
    """SFT from a checkpoint, then `python -m instructgpt_jax.eval --workdir` vs `lm_eval --model hf` on the
    transformers export of the same run (the export's chat template too)."""
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"},
                                                     {"role": "assistant", "content": f"a {i}"}]}) + "\n"
                            for i in range(16)))
    workdir, out = str(tmp_path / "sft"), str(tmp_path / "hf")
    sft.train(stage_config("sft", **{"init.hf_path": ckpt, "data.train": str(rows), "train.num_steps": 2,
                                     "train.batch_size": 4, "data.seq_len": 32, "data.max_prompt_len": 16,
                                     "data.max_response_len": 16}), workdir)
    hf.export_stage(workdir, out)
    result = str(tmp_path / "r.json")
    p = run_eval(f"--workdir={workdir}", "--tasks=tiny_mc,tiny_gen", f"--include_path={tasks}", "--batch_size=4",
                 "--max_length=128", f"--output={result}", "--log_samples", "--apply_chat_template")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tiny_mc" in p.stdout and "acc" in p.stdout and f"results written to {result}" in p.stdout
    ours = json.load(open(result))
    ref = json.loads(json.dumps(hf_backend(out, tasks, ["tiny_mc", "tiny_gen"], apply_chat_template=True),
                                default=lm_eval.utils.handle_non_serializable))
    for t in ("tiny_mc", "tiny_gen"):  # JSON turned the (logprob, greedy) tuples into lists
        for s in ref["samples"][t] + ours["samples"][t]:
            s["resps"] = [[tuple(r[0]) if isinstance(r[0], list) else r[0]] for r in s["resps"]]
            s["arguments"] = [tuple(a) for a in s["arguments"]]
    assert_same(ref, ours, ["tiny_mc", "tiny_gen"])
    # the default output place, and the EMA export name is checked
    p = run_eval(f"--workdir={workdir}", "--tasks=tiny_mc", f"--include_path={tasks}", "--limit=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(os.listdir(os.path.join(workdir, "evals"))) == 1
    p = run_eval(f"--workdir={workdir}", "--export=export_ema", "--tasks=tiny_mc", f"--include_path={tasks}")
    assert p.returncode == 2 and "export_ema" in p.stderr and "['export']" in p.stderr


@pytest.mark.slow
def test_command_line_errors(tasks, tmp_path, rm_workdir):
    for args, words in [
        ([f"--hf_path={tmp_path}", "--tasks=tiny_mc", f"--include_path={tasks}"], "not a Hugging Face directory"),
        ([f"--workdir={rm_workdir}", "--tasks=tiny_mc", f"--include_path={tasks}"], "reward model"),
        ([f"--workdir={rm_workdir}", "--tasks=no_such_task,tiny_mc", f"--include_path={tasks}"], "no_such_task"),
        ([f"--workdir={rm_workdir}", f"--hf_path={tmp_path}", "--tasks=tiny_mc"], "one of them"),
        ([f"--workdir={rm_workdir}"], "--tasks is required"),
        ([f"--workdir={rm_workdir}", "--tasks=x", "--dtype=int4"], "--dtype"),
        ([f"--workdir={rm_workdir}", "--tasks=x", "--limit=0"], "--limit=0"),
        ([f"--workdir={rm_workdir}", "--tasks=x", "--num_fewshot=-1"], "--num_fewshot"),
        ([f"--workdir={rm_workdir}", "--tasks=x", f"--include_path={tmp_path}/nope"], "not a directory"),
    ]:
        p = run_eval(*args)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, p.stderr[-2000:])
    p = run_eval("--help")
    assert p.returncode == 0 and "--tasks" in p.stdout and "--apply_chat_template" in p.stdout


@pytest.mark.slow
def test_ppo_ptx_logs_task_metrics_at_the_interval(tasks, sft_workdir, rm_workdir, tmp_path):
    """train.eval_tasks during PPO-ptx: the task's accuracy in metrics.jsonl every eval_tasks_every steps and at
    the end, computed on the current policy (a task YAML file named directly)."""
    from instructgpt_jax import ppo
    from conftest import BUILTIN
    workdir = str(tmp_path / "ppo")
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "ppo.ptx_coef": 0.5, "train.num_steps": 3, "train.log_every": 5,
                                    "train.eval_tasks": os.path.join(tasks, "mc.yaml"), "train.eval_tasks_every": 2,
                                    "train.eval_tasks_limit": 3})
    ppo.train(config, workdir, builtin_data=BUILTIN)
    logged = {m["step"]: m for m in train_lib.read_metrics(workdir)}
    with_tasks = sorted(s for s, m in logged.items() if "tasks/tiny_mc/acc" in m)
    assert with_tasks == [2, 3]
    assert all(0.0 <= logged[s]["tasks/tiny_mc/acc"] <= 1.0 for s in with_tasks)
    # an unknown task fails before the first step, naming the key
    bad = config_lib_replace(config, **{"train.eval_tasks": "no_such_task"})
    with pytest.raises(ValueError, match="config.train.eval_tasks.*no_such_task"):
        ppo.train(bad, str(tmp_path / "bad"), builtin_data=BUILTIN)
    assert not os.path.exists(os.path.join(tmp_path, "bad", "checkpoints")) or \
        not os.listdir(os.path.join(tmp_path, "bad", "checkpoints"))


def config_lib_replace(config, **kw):
    from instructgpt_jax import config_lib
    return config_lib.replace(config, **kw)


@pytest.mark.slow
def test_tasks_during_training_options(tasks, tmp_path, monkeypatch):
    """train.eval_tasks by name from train.eval_tasks_include_path, train.eval_tasks_limit examples per task, one
    backend for the run (params swapped in); bad values are a UserError naming the key."""
    import ml_collections
    from instructgpt_jax.data import chat
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    model, params = hf.load_pretrained(ckpt)
    tok = hf.load_tokenizer(ckpt)
    config = ml_collections.ConfigDict(dict(seed=0, train=dict(
        eval_tasks="tiny_mc", eval_tasks_every=0, eval_tasks_limit=2, eval_tasks_include_path=tasks)))
    seen, real = [], ev.run_tasks
    monkeypatch.setattr(ev, "run_tasks", lambda lm, *a, **k: seen.append((lm, real(lm, *a, **k))) or seen[-1][1])
    run = ev.tasks_callback(config, model, tok, chat.resolve("auto", tok), sharding.default_mesh())
    first = run({"params": params})
    shifted = jax.tree.map(lambda x: x * 0.5, params)
    second = run({"params": shifted})
    assert set(first) == {"tasks/tiny_mc/acc", "tasks/tiny_mc/acc_norm"}
    assert all(r["n-samples"]["tiny_mc"]["effective"] == 2 for _, r in seen)  # the limit
    assert seen[0][0] is seen[1][0] and seen[1][0].params is shifted  # one backend, the state's params
    assert set(second) == set(first)
    for key, value, match in (("eval_tasks_limit", -1, "eval_tasks_limit"),
                              ("eval_tasks_include_path", str(tmp_path / "nope"), "not a directory"),
                              ("eval_tasks", "no_such_task", "config.train.eval_tasks")):
        bad = ml_collections.ConfigDict(config.to_dict())
        bad.train[key] = value
        with pytest.raises(ValueError, match=match):
            ev.tasks_callback(bad, model, tok, None, sharding.default_mesh())


@pytest.mark.slow
def test_num_fewshot_and_dtype_change_the_requests_and_scores(tasks, tmp_path):
    ckpt = make_checkpoint(str(tmp_path / "ckpt"), "qwen2.5")
    f32 = ev.JaxLM(hf_path=ckpt, batch_size=4, max_length=128)
    zero = ev.run_tasks(f32, ["tiny_mc"], include_path=[tasks], log_samples=True)
    two = ev.run_tasks(f32, ["tiny_mc"], include_path=[tasks], log_samples=True, num_fewshot=2)
    ctx0, ctx2 = zero["samples"]["tiny_mc"][0]["arguments"][0][0], two["samples"]["tiny_mc"][0]["arguments"][0][0]
    assert ctx2.endswith(ctx0) and ctx2.count("Question") == 3  # two solved examples before the question
    bf16 = ev.run_tasks(ev.JaxLM(hf_path=ckpt, batch_size=4, max_length=128, dtype="bfloat16"), ["tiny_mc"],
                        include_path=[tasks], log_samples=True)
    a = [s["resps"][0][0][0] for s in zero["samples"]["tiny_mc"]]
    b = [s["resps"][0][0][0] for s in bf16["samples"]["tiny_mc"]]
    assert a != b and np.allclose(a, b, atol=0.5)  # bfloat16 compute: close, not equal
