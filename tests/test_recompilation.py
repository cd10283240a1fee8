"""No recompilation after warm-up: further SFT train steps, sampler calls and PPO iterations with the
same shapes compile nothing (not a timing test: it counts compilations; the RM stage jits its step
exactly like SFT, through the same `sharding.place` + donated-state pattern).

A step whose outputs come back with a different type, sharding or weak-type than its inputs (for
example a step counter that starts as a Python int, or params that come out of a donated update
committed differently) compiles a second time on its next call; a sampler closed over Python
values that change per call compiles every call. Both cost seconds per step on CPU and minutes on
big models, silently. The loops below are the stages' own: jit with shardings and donated state on
the stage's mesh, as `sft.train` and `ppo.train` build them.
"""
import contextlib
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructgpt_jax import config_lib, ppo, sampling, sft, sharding, train_lib
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
    state, shardings = sharding.place(sft.init_state(model, tx, None, mesh, jax.random.PRNGKey(0)), mesh)
    step_fn = train_lib.jit_train_step(functools.partial(sft.train_step, model=model, tx=tx), shardings, mesh)
    rng = jax.random.PRNGKey(1)
    with sharding.use(mesh):
        state, metrics = step_fn(state, sharding.host_to_global(_lm_batch(0), mesh), rng)  # warm-up
        float(metrics["loss"])
        with count_compiles() as compiled:
            for i in range(1, 4):  # fresh host batches of the same shape, as the training loop feeds them
                state, metrics = step_fn(state, sharding.host_to_global(_lm_batch(i), mesh), rng)
                float(metrics["loss"])
    assert compiled == [], f"SFT steps after warm-up compiled: {compiled}"
    assert step_fn._cache_size() == 1
    assert int(state["step"]) == 4


@pytest.fixture(scope="module")
def rl_setup(mesh):
    """Policy / RM models and the sampler, shared by the sampler and PPO tests (one sampler compile)."""
    policy, rm_model = Transformer(CFG), Transformer(CFG, head="scalar")
    dummy = jnp.zeros((1, 8), jnp.int32)
    sft_params, _ = sharding.init_sharded(lambda r: policy.init(r, dummy)["params"], jax.random.PRNGKey(0), mesh)
    rm_params, _ = sharding.init_sharded(lambda r: rm_model.init(r, dummy)["params"], jax.random.PRNGKey(1), mesh)
    sampler = sampling.make_sampler(policy, max_new_tokens=6, eos_id=1, pad_id=0, temperature=1.0, top_k=5)
    return {"policy": policy, "rm_model": rm_model, "sft_params": sft_params, "rm_params": rm_params,
            "rm_bias": 0.0, "sampler": sampler}


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


def test_ppo_iteration_compiles_once(mesh, rl_setup):
    """rollout -> scoring -> donated minibatch updates -> the next rollout samples from the *updated*
    params: sampler and scoring must not recompile for params that came out of the update."""
    config = config_lib.replace(_ppo_config(), **{
        "train.batch_size": 4, "ppo.minibatch_size": 2, "ppo.ppo_epochs": 1, "data.max_prompt_len": 8,
        "ppo.max_new_tokens": 6, "ppo.ptx_coef": 0.0})
    cfg, m = config.ppo, rl_setup
    policy, rm_model, sampler = m["policy"], m["rm_model"], m["sampler"]
    policy_tx = train_lib.make_optimizer(config.optim, 10)
    value_tx = train_lib.make_optimizer(config.value_optim, 10)
    state, shardings = sharding.place(ppo.init_state(m, policy_tx, value_tx, config), mesh)
    stats_fn = jax.jit(functools.partial(ppo.rollout_stats, policy=policy, value_model=rm_model, rm_model=rm_model,
                                         rm_bias=0.0, cfg=cfg))
    repl = sharding.replicated(mesh)
    update_fn = jax.jit(functools.partial(ppo.update_step, policy=policy, value_model=rm_model, policy_tx=policy_tx,
                                          value_tx=value_tx, cfg=cfg, prompt_len=8),
                        in_shardings=(shardings, None, None, None, repl), out_shardings=(shardings, repl),
                        donate_argnums=0)
    no_ptx = {"tokens": jnp.zeros((1, 1), jnp.int32)}

    def iteration(it):
        nonlocal state
        rng = jax.random.PRNGKey(it)
        prompts = _prompts(it, mesh)
        sample = sampler(state["policy"]["params"], prompts["prompt_tokens"], prompts["prompt_mask"], rng)
        sample["prompt_mask"] = prompts["prompt_mask"]
        batch, r_metrics = stats_fn(state["policy"]["params"], m["sft_params"], state["value"]["params"],
                                    m["rm_params"], sample, state["kl_beta"])
        jax.device_get(r_metrics)
        perm = jax.random.permutation(jax.random.fold_in(rng, 1), 4)
        for j in range(2):
            state, metrics = update_fn(state, batch, perm[2 * j:2 * j + 2], no_ptx, rng)
        jax.device_get(metrics)

    with sharding.use(mesh):
        iteration(0)
        with count_compiles() as compiled:
            iteration(1)
            iteration(2)
    assert compiled == [], f"PPO iterations after warm-up compiled: {compiled}"
    assert sampler._cache_size() == stats_fn._cache_size() == update_fn._cache_size() == 1


def _ppo_config():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "ppo.py")
    spec = importlib.util.spec_from_file_location("ppo_config_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("tiny")
