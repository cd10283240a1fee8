"""Scale: mesh equivalence on 8 simulated devices, a 2-process run through jax.distributed, the memory plan.

Everything that needs 8 devices runs in ONE subprocess (tests/scale_worker.py: XLA_FLAGS must be
set before jax starts, and one process compiles each program once); the tests here assert on its JSON.
"""
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from instructgpt_jax import config_lib, main, plan
from instructgpt_jax.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "1,4,2": (1, 4, 2), "2,2,2": (2, 2, 2)}
# Less LLVM optimisation: compiles about twice as fast; both sides of every comparison use it.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def env(**extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return e


def tail(text, n=60):
    """The end of a child's stderr, without XLA's SPMD performance warnings."""
    return "\n".join([l for l in text.splitlines() if "spmd_partitioner" not in l][-n:])


# ----------------------------------------------------------------------------- the 8-device worker

@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """tests/scale_worker.py, started in the background: the 2-process test runs alongside it."""
    tmp = tmp_path_factory.mktemp("scale")
    with open(tmp / "stdout", "w") as out, open(tmp / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "scale_worker.py"), str(tmp / "ckpt")],
                                cwd=ROOT, stdout=out, stderr=err,
                                env=env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"))
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def results(worker):
    proc, tmp = worker
    proc.wait(timeout=900)
    lines = [l for l in (tmp / "stdout").read_text().splitlines() if l.startswith("RESULTS ")]
    if proc.returncode or not lines:
        pytest.fail(f"scale_worker.py failed (exit {proc.returncode}):\n{tail((tmp / 'stderr').read_text())}")
    return json.loads(lines[0][len("RESULTS "):])


# ----------------------------------------------------------------------------- two processes
# First in the file, then the plan: both run while the mesh worker (started by the `worker` fixture)
# compiles; the mesh assertions come last.

SFT_ARGS = ["--config=configs/sft.py:tiny", "--config.train.batch_size=4", "--config.train.log_every=1",
            "--config.train.eval_batches=1", "--config.train.checkpoint_every=2", "--config.train.progress=False",
            "--config.data.builtin_size=200", "--config.data.seq_len=32", "--config.data.train=builtin",
            # constant lr: a run resumed with more steps follows the same schedule as one run straight through
            "--config.optim.end_lr_frac=1.0", "--config.optim.warmup_steps=0"]


def launch(workdir, steps, num_processes, cache):
    """Start `python -m instructgpt_jax.main` as N processes of one CPU device each (1 process: 2 devices)."""
    cmd = [sys.executable, "-m", "instructgpt_jax.main", *SFT_ARGS, f"--workdir={workdir}",
           f"--config.train.num_steps={steps}"]
    e = env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    if num_processes == 1:
        runs = [(cmd, dict(e, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}"))]
    else:
        with socket.socket() as sock:  # a free port for the coordinator
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        runs = [(cmd + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                        f"--process_id={i}"], dict(e, XLA_FLAGS=FAST_COMPILE)) for i in range(num_processes)]
    procs = []
    for i, (c, env_) in enumerate(runs):
        log = Path(f"{workdir}.{steps}.{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen(c, cwd=ROOT, env=env_, stdout=subprocess.DEVNULL, stderr=f), log))
    return workdir, procs


def finish(launched, timeout=400):
    """Wait for a launch; if one process fails the others are stopped (they would wait for it forever)
    and every process's stderr is shown. Returns process 0's metrics.jsonl records."""
    workdir, procs = launched
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        if any(p.poll() for p, _ in procs):
            break
        time.sleep(0.2)
    for p, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if any(p.returncode for p, _ in procs):
        pytest.fail("\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n{tail(log.read_text())}"
                              for i, (p, log) in enumerate(procs)))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def start():
    """`launch`, with every process still running at the end of the test killed (after a failure)."""
    started = []
    yield lambda *args: started.append(launch(*args)) or started[-1]
    for _, procs in started:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_two_processes_train_save_and_resume_like_one(tmp_path, worker, start):
    """2 processes x 1 CPU device (gloo collectives over loopback) == 1 process x 2 devices: the same
    losses; a second 2-process launch with more steps resumes from their joint checkpoint.
    (Requests `worker` so that the 8-device worker compiles in the background meanwhile.)"""
    cache = tmp_path / "jax_cache"  # the resumed launch reuses the first one's compiled programs
    one, two = start(tmp_path / "one", 6, 1, cache), start(tmp_path / "two", 4, 2, cache)
    one, two = finish(one), finish(two)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one[:4]], rtol=1e-5)
    resumed = finish(start(tmp_path / "two", 6, 2, cache))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]  # the record reads as one run
    assert resumed[:4] == two  # kept as written (a restart from scratch would rewrite tokens_per_sec)
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in one], rtol=1e-5)
    assert "6" in os.listdir(tmp_path / "two" / "checkpoints")


def test_process_id_out_of_range():
    with pytest.raises(main.app.UsageError, match=r"--process_id=2 is out of range.*valid: 0..1"):
        main.initialize_distributed("127.0.0.1:1234", 2, 2)


# ----------------------------------------------------------------------------- memory plan

TINY = ModelConfig.from_config(config_lib.model_config("tiny"))


def test_plan_param_bytes_by_hand():
    """tiny: 141,056 params; on fsdp=8 everything with an 'embed' axis is split 8 ways and the
    LayerNorms (2 x 4 x 64 + 2 x 64), q/k/v biases (2 x 3 x 64) and MLP biases (2 x 256) are replicated."""
    total, per_device = plan.param_shards(TINY, "lm", plan.abstract_mesh((1, 8, 1)))
    assert total == 512 * 64 + 128 * 64 + 2 * (4 * (64 * 64 + 64) + 2 * (64 * 256) + 256 + 64 + 4 * 64) + 2 * 64
    replicated = 2 * 4 * 64 + 2 * 64 + 2 * 3 * 64 + 2 * 256
    assert per_device == (total - replicated) // 8 + replicated
    p = plan.plan(config_lib.replace(_config("sft"), **{"train.batch_size": 8}), (1, 8, 1))
    assert p.resident == {"model params": 4 * per_device, "model gradients": 4 * per_device,
                          "model Adam mu+nu": 8 * per_device}
    assert plan.param_shards(TINY, "lm", plan.abstract_mesh((1, 1, 1)))[1] == total


def test_plan_kv_cache_by_hand():
    # 4 rows x 64 slots x 2 layers x (k, v) x 4 kv heads x 16 x float32; tensor=2 halves the heads
    assert plan.kv_cache(TINY, 4, 64) == 4 * 64 * 2 * 2 * 4 * 16 * 4
    assert plan.kv_cache(TINY, 4, 64, tensor=2) == plan.kv_cache(TINY, 4, 64) // 2


def test_plan_activations_by_hand():
    # tiny, no remat, float32, 2 rows x 16 tokens on one device; per token and layer: norms 4 x 64,
    # q k v + attention output 4 x 64, scores + probabilities 2 x 4 heads x 16, MLP hidden 2 x 256;
    # plus float32 logits and their gradient, 2 x 512
    per_token = 4 * (2 * (4 * 64 + 4 * 64 + 2 * 4 * 16 + 2 * 256)) + 4 * 2 * 512
    assert plan.activations(TINY, 2, 16, plan.abstract_mesh((1, 1, 1))) == 2 * 16 * per_token
    remat = ModelConfig.from_config({**config_lib.model_config("tiny"), "remat": "full"})
    assert plan.activations(remat, 2, 16, plan.abstract_mesh((1, 1, 1))) < 2 * 16 * per_token
    # a forward pass nothing differentiates (DPO's reference): one block's working set and the logits
    one_block = 4 * (4 * 64 + 4 * 64 + 2 * 4 * 16 + 2 * 256) + 4 * 2 * 512
    assert plan.activations(TINY, 2, 16, plan.abstract_mesh((1, 1, 1)), grad=False) == 2 * 16 * one_block
    # the gated llama MLP keeps four MLP-wide tensors (gate, up, activation, product), not two
    llama = ModelConfig.from_config({**config_lib.model_config("tiny"), "arch": "llama"})
    extra = plan.activations(llama, 2, 16, plan.abstract_mesh((1, 1, 1))) - 2 * 16 * per_token
    assert extra == 2 * 16 * 4 * 2 * (2 * 256)  # rows x tokens x float32 x 2 layers x 2 more MLP tensors


def _config(stage):
    return plan.stage_config(stage, "tiny")


def test_plan_ppo_holds_four_models_and_the_larger_phase():
    p = plan.plan(_config("ppo"), (1, 2, 2))
    assert p.resident["reference params"] == p.resident["policy params"] == p.resident["policy EMA params"]
    assert p.resident["value params"] == p.resident["reward model params"]
    assert p.total == sum(p.resident.values()) + max(p.phases.values())
    big_rm = plan.plan(_config("ppo"), (1, 2, 2), rm_preset="small")
    assert big_rm.resident["value params"] > p.resident["value params"]
    with pytest.raises(ValueError, match="not divisible by data x fsdp"):
        plan.plan(_config("ppo"), (1, 64, 1))  # batch 32 cannot give 64 devices whole rows


def test_plan_critic_free_and_rollout_chunk():
    """GRPO holds no value model; a verifier reward no RM either; the KV cache scales with rollout_chunk."""
    gae, grpo = plan.plan(_config("ppo"), (1, 1, 1)), plan.plan(_config("grpo"), (1, 1, 1))
    assert "value params" in gae.resident and not any(k.startswith("value") for k in grpo.resident)
    assert grpo.total < gae.total
    verifier = plan.plan(config_lib.replace(_config("grpo"), **{"ppo.reward": "verifier"}), (1, 1, 1))
    assert "reward model params" not in verifier.resident
    small, big = (plan.plan(config_lib.replace(_config("ppo"), **{"ppo.rollout_chunk": c}), (1, 1, 1))
                  for c in (8, 32))
    assert big.phases["kv_cache (rollout)"] == 4 * small.phases["kv_cache (rollout)"]


def test_plan_ppo_ignores_grad_accum_which_the_stage_refuses():
    """The RL stage does not accumulate gradients (ppo.check_config refuses grad_accum > 1), so its plan must
    not count on smaller microbatches; SFT's does."""
    accum = {"train.grad_accum": 4}
    for stage in ("ppo", "grpo"):
        one, four = (plan.plan(config_lib.replace(_config(stage), **o), (1, 1, 1)) for o in ({}, accum))
        assert four.phases == one.phases, stage
    sft_one, sft_four = (plan.plan(config_lib.replace(_config("sft"), **o), (1, 1, 1)) for o in ({}, accum))
    assert sft_four.phases["activations"] < sft_one.phases["activations"]


def test_plan_dpo_holds_policy_and_reference():
    config = _config("dpo")
    p = plan.plan(config, (1, 1, 1))
    assert p.resident["reference params"] == p.resident["policy params"]
    # the step differentiates the policy and runs the frozen reference forward, both on k rows per prompt
    cfg, mesh = ModelConfig.from_config(config.model), plan.abstract_mesh((1, 1, 1))
    rows = config.data.max_k * config.train.batch_size
    assert p.phases["activations"] == (plan.activations(cfg, rows, config.data.seq_len, mesh)
                                       + plan.activations(cfg, rows, config.data.seq_len, mesh, grad=False))


@pytest.mark.parametrize("ptx_microbatch", [0, 3, 12])
def test_plan_ppo_update_is_a_policy_program_then_a_value_program(ptx_microbatch):
    """The policy's program differentiates the rollout rows and one micro-batch of pretraining rows at a time (by
    default as many as the minibatch's); the value model's runs after it; the peak is the larger."""
    config = config_lib.replace(_config("ppo"), **{"ppo.ptx_coef": 1.0, "ppo.ptx_batch_size": 12,
                                                   "ppo.ptx_microbatch": ptx_microbatch})
    p = plan.plan(config, (1, 1, 1))
    cfg, mesh, ppo = ModelConfig.from_config(config.model), plan.abstract_mesh((1, 1, 1)), config.ppo
    seq = config.data.max_prompt_len + ppo.max_new_tokens
    micro = plan.ptx_microbatch(config, (1, 1, 1))
    assert micro == (ptx_microbatch or 6)  # tiny: micro-batches (the largest divisor of 12 within 8 rows)
    policy = plan.activations(cfg, ppo.minibatch_size + micro, seq, mesh)
    value = plan.activations(cfg, ppo.minibatch_size, seq, mesh, lm_head=False)
    assert p.phases["activations (policy update)"] == policy and p.phases["activations (value update)"] == value
    assert p.total == sum(p.resident.values()) + max(p.phases.values())


def test_plan_command_line():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "instructgpt_jax.plan", *args], check=False,
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    ok = run("--config=configs/ppo.py:tiny", "--mesh=1,2,2", "--device_memory_gb=1")
    assert ok.returncode == 0, ok.stderr
    assert "policy Adam mu+nu" in ok.stdout and "kv_cache (rollout)" in ok.stdout and ": fits in 1 GiB" in ok.stdout
    bad = run("--config=configs/sft.py:175b", "--mesh=1,8,8", "--config.model.vocab_size=50257")
    assert bad.returncode != 0 and "vocab_size up to a multiple of 8" in bad.stderr


def test_plan_table():
    rows = [r for r in plan.table().splitlines()[2:]]
    assert len(rows) == 9
    cells = {tuple(c.strip() for c in r.strip("|").split("|")[:2]): r for r in rows}
    assert "| 1 = fsdp 1 " in cells[("SFT", "1.3b")]  # 1.3B x 16 bytes = 21 GB fits one device
    gpus_175b = int(cells[("SFT", "175b")].split("|")[3].split("=")[0])
    assert gpus_175b * 80 >= 175e9 * 16 / 2 ** 30  # at least the params + grads + Adam state


# ----------------------------------------------------------------------------- mesh equivalence (asserts)

def expected_shard(name, mesh):
    """Per-device shard of a tiny-model param by the rules: 'embed' over fsdp; vocab, heads, mlp over tensor."""
    _, f, t = mesh
    return {"embed": [512 // t, 64 // f],          # embedding [vocab, embed]
            "wi": [2, 64 // f, 256 // t],          # layers.mlp.wi.kernel [layers, embed, mlp]
            "query": [2, 64 // f, 4 // t, 16],     # layers.attn.query.kernel [layers, embed, heads, head_dim]
            "head": [64 // f, 1]}[name]            # scalar_head.kernel [embed, 1]


def stage_results(results, stage):
    if not results.get(stage):  # a stage the worker did not run is a failure, never a skip
        pytest.fail(f"tests/scale_worker.py returned no {stage!r} results")
    return results[stage]


def test_eight_simulated_devices(results):
    assert results["devices"] == 8


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_losses_match_one_device(results, stage, mesh):
    runs = stage_results(results, stage)
    np.testing.assert_allclose(runs[mesh]["losses"], runs["ref"]["losses"], rtol=2e-6)


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_params_and_adam_state_are_split(results, stage, mesh):
    """The per-device shards themselves, not just the results: params and Adam mu / nu alike."""
    shards = stage_results(results, stage)[mesh]["shards"]
    assert {k.split(".")[1] for k in shards} == {"params", "mu", "nu"}
    for key, s in shards.items():
        hint = "" if key.endswith("params") else (": Adam state must be built with sharding.init_optimizer(tx, "
                                                  "params); a plain jax.jit(tx.init) replicates it")
        assert s["shard"] == expected_shard(key.split(".")[0], MESHES[mesh]), f"{key} {s}{hint}"
    if mesh != "8,1,1":  # pure data parallelism replicates; every other mesh splits
        assert math.prod(shards["embed.mu"]["shard"]) < math.prod(shards["embed.mu"]["global"])


@pytest.mark.parametrize("mesh", MESHES)
def test_qlora_sft_matches_one_device_with_adapters_sharded_like_their_weights(results, mesh):
    runs = stage_results(results, "sft_lora")
    np.testing.assert_allclose(runs[mesh]["losses"], runs["ref"]["losses"], rtol=2e-6)
    _, f, t = MESHES[mesh]
    # query [layers, embed, heads, head_dim] -> A [layers, embed, r], B [layers, r, heads, head_dim];
    # out [layers, heads, head_dim, embed] -> A [layers, heads, head_dim, r], B [layers, r, embed]
    assert runs[mesh]["shards"] == {"query.lora_a": [2, 64 // f, 4], "query.lora_b": [2, 4, 4 // t, 16],
                                    "out.lora_a": [2, 4 // t, 16, 4], "out.lora_b": [2, 4, 64 // f],
                                    "qkernel": [2, 64 // f, 4 // t, 8]}  # nf4 codes: two per byte


def test_sft_params_match_one_device(results):
    # Adam divides by sqrt(nu): gradients near float noise move a weight by up to lr, so this bound is
    # looser than the losses' (lr 1e-3, 3 steps).
    for mesh in MESHES:
        assert results["params_diff"][mesh] < 5e-4, mesh


def test_sharded_init_equals_unsharded(results):
    assert results["init_diff"]["1,4,2"] == 0.0


@pytest.mark.parametrize("mesh", MESHES)
def test_sampler_matches_one_device(results, mesh):
    out, ref = results["sampler"][mesh], results["sampler"]["ref"]
    assert out["tokens"] == ref["tokens"]
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5, rtol=0)


def test_checkpoint_from_8_1_1_restores_onto_1_4_2(results):
    r = results["restore"]
    assert r["equal"] and r["same_shardings"]
    assert r["data_state"] == {"pos": 7}
    for key, s in r["shards"].items():
        assert s["shard"] == expected_shard(key.split(".")[0], MESHES["1,4,2"]), key


def test_grad_accumulation_matches_full_batch(results):
    np.testing.assert_allclose(results["grad_accum"]["losses"], results["sft"]["2,2,2"]["losses"], rtol=2e-6)
    assert results["grad_accum"]["params_diff"] < 5e-4


def test_bf16_compute_keeps_float32_master_params(results):
    bf16 = results["bf16"]
    assert bf16["dtypes"] == ["float32"]  # params and Adam state
    np.testing.assert_allclose(bf16["losses"], results["sft"]["ref"]["losses"][:2], rtol=1e-2)


def test_bad_mesh_errors(results):
    e = results["errors"]
    assert "has 3 devices but 8 are available" in e["product"]
    assert "do not divide the 8 available devices" in e["fill"]
    assert re.search(r"\['layers'\]\['attn'\].*logical axis 'kv_heads'.*size 4.*mesh axis tensor of size 8",
                     e["divide"]), e["divide"]
