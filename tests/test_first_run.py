"""A researcher's first real run from the command line: help, the resolved config, configs installed with the
package, data only when asked, and the finetune presets' lengths and schedule measured on the data."""
import glob
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import ROOT, stage_config

from instructgpt_jax import config_lib, harness
from instructgpt_jax.data import prepare
from instructgpt_jax.data.tokenizer import load_tokenizer


def main(*args, cwd=ROOT, env=None):
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "instructgpt_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_stages_presets_and_keys():
    proc = main("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("sft", "rm", "dpo", "ppo", "grpo", "finetune", "tiny", "qwen2.5-0.5b", "init.hf_path",
                 "init.from_workdir", "data.train", "builtin", "--print_config"):
        assert word in proc.stdout, word


def test_print_config_from_another_directory_touches_nothing(tmp_path):
    workdir = tmp_path / "w"
    proc = main("--config=sft:tiny", f"--workdir={workdir}", "--print_config", "--config.optim.lr=0.125",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "lr: 0.125" in proc.stdout and "stage: sft" in proc.stdout
    assert not workdir.exists()
    # the repository path keeps working, and a missing --workdir is only an error when running
    assert main("--config=configs/rm.py:tiny", "--print_config").returncode == 0
    one_line_error(main("--config=sft:tiny", "--config.data.train=builtin"), "--workdir is required")


def test_print_config_shows_the_adopted_model_and_refuses_a_contradiction(sft_workdir):
    proc = main("--config=rm:finetune", f"--config.init.from_workdir={sft_workdir}", "--print_config")
    assert proc.returncode == 0, proc.stderr
    exported = json.load(open(os.path.join(sft_workdir, "export", "meta.json")))["model"]
    assert f"d_model: {exported['d_model']}" in proc.stdout and "num_epochs: 1.0" in proc.stdout
    one_line_error(main("--config=dpo:tiny", f"--config.init.from_workdir={sft_workdir}",
                        "--config.model.num_layers=7", "--print_config"),
                   "config.model.num_layers=7 contradicts the checkpoint", "num_layers=2")


@pytest.mark.parametrize("args, fragments", [
    (["--config=sft:tiny"], ["config.data.train is empty", "builtin"]),
    (["--config=sft:finetune"], ["'finetune' preset starts from a checkpoint", "init.hf_path"]),
    (["--config=rm:tiny", "--config.data.train=builtin"], ["config.data.demonstrations is empty"]),
    # full-size PPO presets are PPO-ptx (the paper's 27.8): pretraining text is required
    (["--config=ppo:125m", "--config.data.train=prompts.jsonl"], ["config.data.ptx is empty but config.ppo.ptx_coef=27.8 > 0"]),
])
def test_missing_data_is_one_line_and_writes_nothing(tmp_path, args, fragments):
    proc = main(*args, f"--workdir={tmp_path / 'w'}")
    one_line_error(proc, *fragments)
    assert not (tmp_path / "w").exists()


def test_ptx_without_pretraining_text_is_an_error(sft_workdir, rm_workdir):
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "ppo.ptx_coef": 1.0, "data.ptx": ""})
    with pytest.raises(ValueError, match=r"config.data.ptx is empty but config.ppo.ptx_coef=1.0 > 0"):
        harness.resolve(config)
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "ppo.ptx_coef": 0.0, "data.ptx": ""})
    harness.resolve(config)  # plain PPO needs none


def test_wheel_ships_the_configs_and_runs_from_anywhere(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), ROOT], check=True, capture_output=True, timeout=300)
    wheel = glob.glob(str(dist / "instructgpt_jax-*.whl"))[0]
    names = zipfile.ZipFile(wheel).namelist()
    for stage in ("sft", "rm", "dpo", "ppo", "grpo", "pretrain", "pipeline"):
        assert f"instructgpt_jax/configs/{stage}.py" in names
    target = tmp_path / "site"  # the wheel alone, ahead of the editable install on the path
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = main("--config=sft:tiny", "--print_config", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "stage: sft" in proc.stdout, proc.stderr
    where = subprocess.run([sys.executable, "-c", "from instructgpt_jax import config_lib; print(config_lib.CONFIG_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(target))


def test_finetune_presets_use_published_recipes_and_epochs():
    for stage, lr in (("sft", 2e-5), ("rm", 9e-6), ("dpo", 5e-7), ("ppo", 1e-6), ("grpo", 1e-6)):
        c = config_lib.load(stage, "finetune")
        assert c.model.preset == config_lib.FROM_CHECKPOINT and c.model.dtype == "bfloat16"
        assert c.optim.lr == lr and c.train.num_epochs > 0 and c.model.dropout == 0.0
        assert c.ppo.ptx_coef == 0.0 if "ppo" in c else True  # PPO-ptx only with the user's pretraining text


def test_explicit_steps_win_over_a_presets_epochs(sft_workdir):
    config = config_lib.load("rm", "finetune", **{"init.from_workdir": sft_workdir, "train.num_steps": 7,
                                                  "data.train": "x.jsonl"})
    assert harness.resolve(config, explicit=["train.num_steps"]).train.num_epochs == 0
    assert harness.resolve(config).train.num_epochs == 1.0


def test_fit_to_data_brute_force(sft_workdir):
    """seq_len = the longest example rounded up to 64 (<= context), steps = epochs x packed rows / batch."""
    tok = load_tokenizer(os.path.join(sft_workdir, "export"))
    rng = np.random.RandomState(0)
    words = "the cat sat on a mat while dogs ran past quickly".split()
    rows = [{"prompt": " ".join(rng.choice(words, rng.randint(1, 8))),
             "response": " ".join(rng.choice(words, rng.randint(1, 30))), "messages": []} for _ in range(37)]
    head = [tok.bos_id] if tok.add_bos else []
    totals = [len(head) + len(tok.encode(r["prompt"])) + len(tok.encode(r["response"])) + 1 for r in rows]
    prompts = [len(head) + len(tok.encode(r["prompt"])) for r in rows]
    config = config_lib.load("sft", "tiny", **{"data.seq_len": 0, "data.max_prompt_len": 0,
                                               "data.max_response_len": 0, "train.num_epochs": 3.0,
                                               "train.batch_size": 4})
    fitted = prepare.fit_to_data(config, "demonstrations", rows, tok, None)
    seq_len = min(math.ceil((max(totals) - 1) / 64) * 64, config.model.max_len)
    assert config.data.seq_len == seq_len == fitted["data.seq_len"]
    assert config.data.max_prompt_len == (max(prompts) if max(totals) <= seq_len + 1 else seq_len // 2)
    tokens = sum(min(t - 1, seq_len) for t in totals)
    assert config.train.num_steps == math.ceil(3.0 * tokens / seq_len / 4)
    # comparisons: one prompt per batch row
    comparisons = [{"prompt": r["prompt"], "messages": [], "completions": [r["response"], "a b"], "ranks": [0, 1]}
                   for r in rows]
    config = config_lib.load("rm", "tiny", **{"data.seq_len": 0, "data.max_prompt_len": 0, "train.num_epochs": 2.0,
                                              "train.batch_size": 8})
    prepare.fit_to_data(config, "comparisons", comparisons, tok, None)
    assert config.train.num_steps == math.ceil(2.0 * 37 / 8)
    assert config.data.seq_len == min(math.ceil(max(totals) / 64) * 64, config.model.max_len)


def test_warmup_frac_is_a_fraction_of_the_run():
    from instructgpt_jax import train_lib
    optim = config_lib.optim_config(1.0, warmup_steps=50)
    optim.warmup_frac, optim.end_lr_frac = 0.1, 0.0
    sched = train_lib.lr_schedule(optim, num_steps=200, updates_per_step=2)  # warmup: 20 steps = 40 updates
    np.testing.assert_allclose([float(sched(0)), float(sched(20)), float(sched(40))], [0.0, 0.5, 1.0], atol=1e-6)
    optim.warmup_frac = 0.0  # off: warmup_steps (50 steps = 100 updates) counts again
    np.testing.assert_allclose(float(sched(40)), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(train_lib.lr_schedule(optim, 200, 2)(50)), 0.5, atol=1e-6)
