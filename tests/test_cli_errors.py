"""The command line shows a user's mistake as one line `error: ...` with exit status 2, and the
traceback only with --debug / INSTRUCTGPT_DEBUG=1 (real subprocesses of `python -m instructgpt_jax.main`)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, debug_env=False, workdir):
    env = {k: v for k, v in os.environ.items() if k != "INSTRUCTGPT_DEBUG"}
    env["JAX_PLATFORMS"] = "cpu"
    if debug_env:
        env["INSTRUCTGPT_DEBUG"] = "1"
    cmd = [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/sft.py:tiny",
           "--config.train.num_steps=1", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # the message is the one last line
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "demos.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n')
    return str(path)


def test_malformed_data_file(bad_data, tmp_path):
    proc = run_main(f"--config.data.train={bad_data}", workdir=tmp_path / "w")
    assert_one_line_error(proc, f"error: {bad_data}:2: missing field 'response'", "row has: answer, prompt")
    # INSTRUCTGPT_DEBUG=1: the same error, raised with its traceback.
    proc = run_main(f"--config.data.train={bad_data}", debug_env=True, workdir=tmp_path / "w")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert f"UserError: {bad_data}:2: missing field 'response'" in proc.stderr


def test_unknown_config_key(tmp_path):
    proc = run_main("--config.train.num_stepz=3", workdir=tmp_path / "w")
    assert_one_line_error(proc, "error: unknown config key 'config.train.num_stepz' (--config.train.num_stepz); "
                                "valid keys in config.train: ", "num_steps")
    proc = run_main("--config.train.num_stepz=3", "--debug", workdir=tmp_path / "w")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "'num_stepz'" in proc.stderr
    assert not os.path.exists(tmp_path / "w")  # nothing ran


def test_bad_override_value_and_unknown_preset(tmp_path):
    proc = run_main("--config.train.num_steps=abc", workdir=tmp_path / "w")
    assert_one_line_error(proc, "error: flag --config.train.num_steps=abc: invalid literal for int()")
    proc = run_main("--config=configs/sft.py:huge", workdir=tmp_path / "w")  # the last --config wins
    assert_one_line_error(proc, "error: flag --config=configs/sft.py:huge: unknown preset 'huge'; valid presets: finetune, tiny")
