"""Shared tiny runs: one SFT and one RM workdir per test session, reused by the stage tests
(JAX compilation dominates on CPU, so every stage is trained once and inspected many times)."""
import os
import shutil
import tempfile

# One XLA compilation cache for the session, set before jax is imported: the tests compile many identical
# programs (the same tiny model's steps in several tests, resumed runs, and the command-line and notebook
# subprocesses, which inherit it). Counting compilations (test_recompilation) is unaffected: a cache hit
# is still a jit cache miss that logs "Compiling".
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="instructgpt_jax_xla_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import pytest  # noqa: E402

from instructgpt_jax import config_lib  # noqa: E402
from instructgpt_jax.miniature.world import builtin_rows as BUILTIN  # noqa: F401,E402  (stages' built-in data)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_config(stage: str, **overrides):
    """configs/<stage>.py:tiny shrunk for tests (short rows, small built-in data, no progress bar)."""
    config = config_lib.load(stage, "tiny")
    small = {"train.progress": False, "data.builtin_size": 400, "data.train": "builtin"}
    if stage in ("sft", "pretrain"):
        small.update({"data.seq_len": 64, "data.max_prompt_len": 32, "data.max_response_len": 32,
                      "train.batch_size": 8, "train.num_steps": 30, "train.log_every": 1, "train.eval_every": 0,
                      "train.checkpoint_every": 5})
    elif stage in ("rm", "dpo"):
        small.update({"data.seq_len": 48, "data.max_prompt_len": 24, "train.batch_size": 8, "train.num_steps": 40,
                      "train.log_every": 5, "train.eval_every": 0, "train.eval_batches": 0,
                      **({"rm.bias_examples": 64} if stage == "rm" else {"train.num_steps": 6})})
    elif stage in ("ppo", "grpo"):
        small.update({"data.max_prompt_len": 24, "ppo.max_new_tokens": 16, "train.batch_size": 8,
                      "ppo.minibatch_size": 4, "train.num_steps": 2, "train.eval_every": 0, "train.eval_batches": 1,
                      "ppo.ptx_batch_size": 4, "data.ptx_seq_len": 32, "data.ptx": "builtin"})
    small.update(overrides)
    return config_lib.replace(config, **small)


class Interrupt(Exception):
    """Stands for a run killed between two steps (the exact-resumption tests)."""


def interrupting(it, after: int):
    """A data iterator (with get_state / set_state) that raises Interrupt when asked for item `after + 1`."""
    count = [0]

    class Wrapped:
        def __next__(self):
            count[0] += 1
            if count[0] > after:
                raise Interrupt
            return next(it)
        get_state, set_state = it.get_state, it.set_state
    return Wrapped()


def ppo_interrupted_then_resumed(config, workdir: str, monkeypatch, after: int = 1) -> None:
    """The RL stage killed when it asks for prompt batch `after + 1`, then rerun to the end in the same workdir."""
    from instructgpt_jax import ppo
    from instructgpt_jax.data import prepare
    original = prepare.prepare_ppo

    def interrupted(*args, **kwargs):
        data = original(*args, **kwargs)
        data.prompts = interrupting(data.prompts, after)
        return data
    monkeypatch.setattr(prepare, "prepare_ppo", interrupted)
    with pytest.raises(Interrupt):
        ppo.train(config, workdir, builtin_data=BUILTIN)
    monkeypatch.setattr(prepare, "prepare_ppo", original)
    ppo.train(config, workdir, builtin_data=BUILTIN)


@pytest.fixture(scope="session")
def sft_workdir(tmp_path_factory):
    from instructgpt_jax import sft
    workdir = str(tmp_path_factory.mktemp("sft"))
    sft.train(stage_config("sft"), workdir, builtin_data=BUILTIN)
    return workdir


@pytest.fixture(scope="session")
def rm_workdir(tmp_path_factory, sft_workdir):
    from instructgpt_jax import rm
    workdir = str(tmp_path_factory.mktemp("rm"))
    rm.train(stage_config("rm", **{"init.from_workdir": sft_workdir}), workdir, builtin_data=BUILTIN)
    return workdir


# Long end-to-end runs (`pytest -m slow`, which .ci/run runs after the default suite): every test that uses one
# of these fixtures is marked slow, so the default suite stays within its time budget on 2 cores.
SLOW_FIXTURES = {
    "worker",         # test_scale: the 8-simulated-device worker (every stage on 4 meshes) and the 2-process run
    "smoke_default",  # test_pipeline: the miniature pipeline's smoke run
}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def pytest_sessionfinish(session, exitstatus):
    if "_CACHE" in globals():
        shutil.rmtree(_CACHE, ignore_errors=True)
