"""SIGTERM / SIGINT during training save the current step and exit with one line (143 / 130); rerunning
the same command resumes to the same result as an uninterrupted run. Without a terminal the loop logs plain
lines instead of a progress bar. Real subprocesses of `python -m instructgpt_jax.main` on sft tiny."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from instructgpt_jax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 80
MESSAGE = re.compile(r"interrupted by (SIG\w+) at step (\d+); checkpoint saved in (\S+); "
                     r"rerun the same command to resume")
# A plain progress line: step 1 has no speed yet (its time is the compilation's).
PLAIN = re.compile(rf"sft: step (\d+)/{STEPS} loss=\S+( \S+ (steps/s|s/step) ETA \d+:\d\d:\d\d)?")


def command(workdir):
    """sft tiny on the built-in data, small rows and batches; progress left on (the default): stderr is a file
    here, not a terminal, so the loop must print plain lines, not a bar."""
    return [sys.executable, "-m", "instructgpt_jax.main", "--config=configs/sft.py:tiny", f"--workdir={workdir}",
            "--config.data.train=builtin", "--config.data.builtin_size=400", "--config.data.seq_len=64",
            "--config.data.max_prompt_len=32", "--config.data.max_response_len=32", "--config.train.batch_size=8",
            f"--config.train.num_steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.train.checkpoint_every=1000"]


def start(workdir, log):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # inherits conftest's shared compilation cache
    env.pop("INSTRUCTGPT_DEBUG", None)
    with open(log, "w") as err:
        return subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def read(path):
    with open(path) as f:
        return f.read()


def run_to_end(workdir, log):
    proc = start(workdir, log)
    assert proc.wait(timeout=600) == 0, read(log)[-3000:]
    return read(log)


def interrupt(workdir, log, signum, after_steps=3):
    """Start a run, send `signum` once metrics.jsonl has `after_steps` records; (exit status, stderr)."""
    proc = start(workdir, log)
    metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 300
    while not (os.path.exists(metrics) and read(metrics).count("\n") >= after_steps):
        assert proc.poll() is None and time.time() < deadline, read(log)[-3000:]
        time.sleep(0.05)
    proc.send_signal(signum)
    try:
        return proc.wait(timeout=60), read(log)
    finally:
        proc.kill()


def assert_stopped_cleanly(rc, stderr, signame, status, workdir):
    """Exit status, no traceback, the one-line message last, a checkpoint of the step it names. Returns the step."""
    assert rc == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    said = [line for line in lines if line.startswith("interrupted")]
    assert len(said) == 1 and said[0] == lines[-1], stderr[-3000:]
    name, step, where = MESSAGE.fullmatch(said[0]).groups()
    step = int(step)
    assert name == signame and where == str(workdir) and 3 <= step < STEPS, said[0]
    saved = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert saved == [step]  # checkpoint_every is large: the only checkpoint is the interrupt's
    assert train_lib.read_metrics(workdir)[-1]["step"] == step
    return step


def exported(workdir):
    params = ocp.StandardCheckpointer().restore(os.path.join(workdir, "export", "params"))
    return {k: np.asarray(v) for k, v in ocp.tree.to_flat_dict(params, sep="/").items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run: (workdir, stderr)."""
    tmp = tmp_path_factory.mktemp("straight")
    return tmp / "w", run_to_end(tmp / "w", tmp / "stderr")


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """The same command stopped by SIGTERM, then rerun to the end: (workdir, step, stderr of both runs)."""
    tmp = tmp_path_factory.mktemp("sigterm")
    rc, first = interrupt(tmp / "w", tmp / "stderr1", signal.SIGTERM)
    step = assert_stopped_cleanly(rc, first, "SIGTERM", 143, tmp / "w")
    return tmp / "w", step, first, run_to_end(tmp / "w", tmp / "stderr2")


@pytest.mark.slow  # ~40 s of CLI runs; the quick suite keeps SIGINT and test_sft's resume
def test_sigterm_saves_the_step_and_resumes_exactly(straight, resumed):
    (straight_dir, _), (workdir, step, _, _) = straight, resumed
    again = {r["step"]: r["loss"] for r in train_lib.read_metrics(workdir)}
    same = {r["step"]: r["loss"] for r in train_lib.read_metrics(straight_dir)}
    assert sorted(again) == sorted(same) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([again[s] for s in same], list(same.values()), rtol=1e-6)
    a, b = exported(workdir), exported(straight_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_sigint_exits_130(tmp_path):
    rc, stderr = interrupt(tmp_path / "w", tmp_path / "stderr", signal.SIGINT)
    assert_stopped_cleanly(rc, stderr, "SIGINT", 130, tmp_path / "w")


@pytest.mark.slow  # shares the SIGTERM runs
def test_plain_progress_lines_without_a_terminal(straight, resumed):
    """stderr is a file: one plain line per logged step, said compiling first, no carriage-return bar."""
    (_, whole), (_, step, first, rest) = straight, resumed
    for stderr, steps in ((whole, range(1, STEPS + 1)), (rest, range(step + 1, STEPS + 1))):
        assert "\r" not in stderr and "Traceback" not in stderr
        lines = stderr.splitlines()
        compiling = lines.index("sft: compiling the train step (first step)...")
        assert re.fullmatch(r"sft: first step compiled and run in \d+\.\ds", lines[compiling + 1])
        plain = [PLAIN.fullmatch(line) for line in lines if line.startswith("sft: step ")]
        assert all(plain), lines
        assert [int(m.group(1)) for m in plain] == list(steps)
        assert all(m.group(2) for m in plain[1:])  # speed and ETA once the first step is done
    assert "\r" not in first and PLAIN.fullmatch(first.splitlines()[-2])
    # the startup block says what the stage starts from, on what, for how long
    for stderr, weights in ((whole, "scratch (random init)"), (rest, f"resuming ")):
        block = stderr[:stderr.index("sft: compiling")]
        assert f"  weights   {weights}" in block, block
        for fragment in ("  model     gpt2, ", "M params", "  tokenizer SentencePieceTokenizer", "EOS ids",
                         "  data      train builtin (", "  data      eval ", "  mesh      ",
                         f"  schedule  {STEPS} steps of batch", "  writes    checkpoints/"):
            assert fragment in block, (fragment, block)
