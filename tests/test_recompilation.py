"""No recompilation after warm-up: further SFT train steps, sampler calls and PPO iterations with the
same shapes compile nothing (not a timing test: it counts compilations; the RM stage jits its step
exactly like SFT, through the same `sharding.place` + donated-state pattern).

A step whose outputs come back with a different type, sharding or weak-type than its inputs (for
example a step counter that starts as a Python int, or params that come out of a donated update
committed differently) compiles a second time on its next call; a sampler closed over Python
values that change per call compiles every call. Both cost seconds per step on CPU and minutes on
big models, silently. The SFT step is jitted as the stages jit it; the RL stage is run itself.
"""
import contextlib
import functools
import logging
import subprocess
import sys

import jax
import numpy as np
import pytest

from instructgpt_jax import config_lib, harness, ppo, sampling, sft, sharding, train_lib
from instructgpt_jax.models import ModelConfig, Transformer

CFG = ModelConfig(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, vocab_size=128,
                  max_len=64)


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Compiling "):
            self.names.append(msg.split(" with ")[0].removeprefix("Compiling "))


@contextlib.contextmanager
def count_compiles():
    """Names of the programs XLA compiles inside the block (jax.log_compiles messages)."""
    handler = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield handler.names
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(config_lib.mesh_config())


def _lm_batch(seed, b=4, t=16):
    rs = np.random.RandomState(seed)
    rows = rs.randint(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "segment_ids": np.ones((b, t), np.int32)}


def test_sft_train_step_compiles_once(mesh):
    model = Transformer(CFG)
    tx = train_lib.make_optimizer(config_lib.optim_config(1e-3), 100)
    state, shardings = sharding.place(train_lib.new_state(sharding.init_model(model, jax.random.PRNGKey(0), mesh), tx),
                                      mesh)
    step_fn = train_lib.jit_train_step(functools.partial(train_lib.train_step, tx=tx,
                                                         loss_fn=functools.partial(sft.loss_fn, model=model)),
                                       shardings, mesh)
    rng = jax.random.PRNGKey(1)
    with sharding.use(mesh):
        state, metrics = step_fn(state, sharding.host_to_global(_lm_batch(0), mesh), rng)  # warm-up
        float(metrics["loss"])
        with count_compiles() as compiled:
            for i in range(1, 4):  # fresh host batches of the same shape, as the training loop feeds them
                state, metrics = step_fn(state, sharding.host_to_global(_lm_batch(i), mesh), rng)
                float(metrics["loss"])
    assert compiled == [], f"SFT steps after warm-up compiled: {compiled}"
    assert int(state["step"]) == 4


@pytest.fixture(scope="module")
def rl_setup(mesh):
    """A policy and its sampler."""
    policy = Transformer(CFG)
    sampler = sampling.make_sampler(policy, max_new_tokens=6, eos_id=1, pad_id=0, temperature=1.0, top_k=5)
    return {"sft_params": sharding.init_model(policy, jax.random.PRNGKey(0), mesh), "sampler": sampler}


def _prompts(seed, mesh, b=4, p=8):
    """Left-padded prompts (a different pad pattern per seed), as global arrays."""
    rs = np.random.RandomState(seed)
    mask = (np.arange(p)[None] >= rs.randint(0, p // 2, (b, 1))).astype(np.int32)
    return sharding.host_to_global({"prompt_tokens": rs.randint(2, CFG.vocab_size, (b, p)).astype(np.int32) * mask,
                                    "prompt_mask": mask}, mesh)


def test_sampler_compiles_once(mesh, rl_setup):
    sampler, params = rl_setup["sampler"], rl_setup["sft_params"]
    with sharding.use(mesh):
        g = _prompts(0, mesh)
        jax.block_until_ready(sampler(params, g["prompt_tokens"], g["prompt_mask"], jax.random.PRNGKey(0)))
        with count_compiles() as compiled:
            for i in range(1, 4):  # new prompts (other pad patterns), new keys: same shapes
                g = _prompts(i, mesh)
                out = sampler(params, g["prompt_tokens"], g["prompt_mask"], jax.random.PRNGKey(i))
                np.asarray(out["tokens"])
    assert compiled == [], f"sampler calls after warm-up compiled: {compiled}"
    assert sampler._cache_size() == 1


@pytest.mark.slow  # default-suite budget: `pytest -m slow` (CI runs it)
def test_ppo_iterations_compile_once(tmp_path, monkeypatch, sft_workdir, rm_workdir):
    """The RL stage itself (`ppo.train`, 3 iterations): rollout -> scoring -> donated minibatch updates ->
    the next rollout samples from the *updated* params. Iterations 2 and 3 (and the final evaluation,
    which reuses the rollout programs) compile nothing."""
    from conftest import BUILTIN, stage_config
    compiled, real_fit = [], train_lib.fit

    def fit(**kw):
        step = kw["step"]

        def counted(state, n):
            if n == 1:
                return step(state, n)
            with count_compiles() as names:
                out = jax.block_until_ready(step(state, n))
            compiled.extend(names)
            return out
        return real_fit(**dict(kw, step=counted))

    monkeypatch.setattr(train_lib, "fit", fit)
    config = stage_config("ppo", **{"init.from_workdir": sft_workdir, "ppo.rm_workdir": rm_workdir,
                                    "train.num_steps": 3, "ppo.ptx_coef": 0.5, "ppo.max_new_tokens": 6,
                                    "train.checkpoint_every": 100})
    ppo.train(config, str(tmp_path), builtin_data=BUILTIN)
    assert compiled == [], f"PPO iterations after the first compiled: {compiled}"


TRIM_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
from instructgpt_jax import harness
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
on = harness.trim_after_compiles() if {on} else False
keep = [np.ones(100_000 // 8) for _ in range(3000)]  # 300 MB in 100 KB heap chunks (below glibc's mmap threshold)
del keep[:-1]  # freed, but the allocator keeps it: the last chunk pins the heap's top
before = rss()
jax.jit(lambda x: x * 3 + 2)(jnp.ones(7)).block_until_ready()  # a new program: one XLA compilation
print(on, (before - rss()) / 1e6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os_after_each_compilation():
    """`harness.trim_after_compiles` (every stage turns it on): the listener trims once per XLA compilation,
    and memory freed before a compilation leaves the process (it stays without the listener)."""
    assert harness.trim_after_compiles()
    calls, trim = [], harness._trim[0]
    harness._trim[0] = calls.append
    try:
        jax.jit(lambda x: x * 5 - 1)(np.ones(3, np.float32))
    finally:
        harness._trim[0] = trim
    assert calls == [0]
    for on in (True, False):
        out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT.format(on=on)], capture_output=True, text=True,
                             check=True).stdout.split()
        returned_mb = float(out[1])
        assert out[0] == str(on) and (returned_mb > 200 if on else returned_mb < 50), (on, returned_mb)
