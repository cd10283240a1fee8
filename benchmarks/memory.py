"""Memory (and step time) of full fine-tuning, LoRA and QLoRA: an SFT step, a DPO step, a PPO-ptx iteration.

    python benchmarks/memory.py [--stages sft,dpo,ppo] [--modes full,lora,nf4] [--remats none,full] [--chunks 0,512]
                                [--steps 2] [--dpo_steps 1] [--dpo_batch 2] [--ppo_updates 1]
                                [--time_reps 3] [--no-time] [--max_xla_gb 16] [--max_rss_gb 20]
                                [--workdir DIR] [--out results.json] [--verbose]

The `smollm2-135m` preset (llama, 30 layers, d_model 576, vocab 49152, tied embeddings) with RANDOM weights,
nothing downloaded: a setup subprocess writes an SFT export (`sft.train` with 0 steps: random init, and the
SentencePiece tokenizer the stage trains on the built-in data when none is given: ~500 tokens, while
model.vocab_size stays 49152, which the stages accept) and an RM export from it (`rm.train`, 0 steps). Every
measured run starts from these exports (`init.from_workdir`, `ppo.rm_workdir`) on the built-in data, with the
stage settings of configs/<stage>.py:tiny and the model keys of smollm2-135m (scan_unroll 1, causal_blocks 1,
dropout 0; `--dtype` compute, float32 by default):

  sft  16 packed rows of 128 tokens per step (`--steps` steps)
  dpo  `--dpo_batch` prompts x max_k 9 completions x 128 tokens per step (policy + frozen reference). The tiny
       preset's 16 prompts (144 rows) would need ~32 GB by the plan, more than this 23 GiB machine has: 2
       prompts (18 rows) is the memory of 16 prompts with train.grad_accum 8, less its gradient accumulator
  ppo  one PPO-ptx iteration (ppo.ptx_coef 1): sample 32 rollouts of <= 64 prompt + 64 tokens and score them
       (policy, reference, value and reward model; chunks of 8), then minibatch updates of 8 rollouts + 32
       pretraining rows of 128 tokens (2 epochs = 8 updates) of the policy and the value model. The iteration
       is stopped after its first `--ppo_updates` updates (every update is the same program on the same
       buffers, so later ones add time, not memory; 8 = the whole iteration, ~8 min per mode here)

Modes: `full` (lora.rank 0), `lora` (rank 16, alpha 32, all-linear, float32 base), `nf4` (the same adapters
on an NF4 base: QLoRA). `--remats`: model.remat values ('full', the default of the full-size presets: each
block keeps only its input for the backward pass and recomputes the rest). `--chunks`: model.logits_chunk
values (0 = the LM head over all tokens at once). A chunk at least as large as every LM-head call of the stage
(rows x positions: SFT 16 x 128, DPO 18 x 127, PPO 32 ptx rows x 128) chunks nothing (`scoring.token_stats` runs
unchunked when B x N <= C): such a row is the same program as logits_chunk 0 and is not run again, its row says
so.

Each measurement is a fresh subprocess running the stage's own `train()` (`sft.train`, `dpo.train`,
`ppo.train`) up to its loop; in that subprocess only, `train_lib.fit` is replaced by a loop that runs the steps
and then stops before any checkpoint or export, and the step the stage jits is compiled ahead of time at its
first call (`jitted.lower(*args).compile()`; that executable then runs every step: one compilation) for XLA's
memory analysis. SFT / DPO: the generic `train_lib.train_step` on the stage's `lora.with_base(loss_fn)`, taken
from `train_lib.jit_train_step`; PPO: the two programs of its update, `ppo.policy_step` and `ppo.value_step`, taken
from their `jax.jit` (each compiled ahead of time; the XLA columns give the one whose total is the larger). Columns:

  RSS at step  resident memory when the step is first called (Python, JAX, data, the models and train state)
  peak RSS     `ru_maxrss` of the subprocess at the end: everything it ever held, compilation included
  XLA temp     `compiled.memory_analysis().temp_size_in_bytes` of the step (activations kept for the backward,
               gradients, ...)
  XLA total    the step's arguments (each live buffer once: LoRA DPO passes its base twice, as base and
               reference) + outputs - donated aliases + temp, plus every other live jax array at the step's
               first call (PPO full fine-tuning: the reference and the reward model, which the update step does
               not take): the bytes the stage holds on the device while the step runs, what a plan estimates
  plan         `plan.plan(config, (1, 1, 1), stage=...)`.total for the same config; plan / XLA
  time s       SFT / DPO: median of steps 2..N, else the first step's run after compilation; PPO: the rollout
               phase (sampler and scoring forward passes, their compilation included) + one compiled update

A step whose XLA total exceeds --max_xla_gb is compiled but not run (its row gives XLA's and the plan's
figures); a parent watchdog kills a subprocess whose RSS exceeds --max_rss_gb. Finally (unless --no-time) one
more subprocess times the SFT step of the modes alternately (`common.time_alternately`, `--time_reps` timed
steps each after a warm-up step, logits_chunk `--time_chunk`, each remat of `--time_remat`, `--dtype`) and gives
each relative to full fine-tuning with the same remat.
GB = 1e9 bytes.
"""
from __future__ import annotations

import argparse
import functools
import gc
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the checkout on sys.path)

HERE = os.path.abspath(__file__)
GB = 1e9
MODES = {
    "full": {"lora.rank": 0, "lora.base_dtype": "float32"},
    "lora": {"lora.rank": 16, "lora.alpha": 32.0, "lora.targets": "all-linear", "lora.base_dtype": "float32"},
    "nf4": {"lora.rank": 16, "lora.alpha": 32.0, "lora.targets": "all-linear", "lora.base_dtype": "nf4"},
}
MODE_LABEL = {"full": "full fine-tuning", "lora": "LoRA r16 (f32 base)", "nf4": "QLoRA r16 (NF4 base)"}
PRESET = "smollm2-135m"
# Targets of the LoRA / QLoRA issue: peak RSS of one PPO-ptx iteration (GB), plan vs XLA, LoRA step time
TARGETS = {"full": 7.5, "lora": 3.0, "nf4": 2.0}


# ----------------------------------------------------------------------------- configs

def base_config(stage: str, **overrides):
    """configs/<stage>.py:tiny with the smollm2-135m model keys (dropout 0), built-in data, no progress bar."""
    from instructgpt_jax import config_lib
    config = config_lib.load(stage, "tiny")
    config.model = config_lib.model_config(PRESET)
    config.model.dropout = 0.0
    keys = {"train.progress": False, "data.train": "builtin", "train.eval_every": 0}
    keys.update(overrides)
    return config_lib.replace(config, **keys)


def stage_config(stage: str, mode: str, chunk: int, steps: int, sft_dir: str, rm_dir: str, dpo_batch: int = 2,
                 remat: str = "none", dtype: str = "float32"):
    keys = {"init.from_workdir": sft_dir, "model.logits_chunk": chunk, "model.remat": remat, "model.dtype": dtype,
            "train.num_steps": steps, **MODES[mode]}
    if stage == "dpo":
        keys["train.batch_size"] = dpo_batch
    if stage == "ppo":
        keys.update({"ppo.rm_workdir": rm_dir, "data.ptx": "builtin", "ppo.ptx_coef": 1.0, "train.num_steps": 1})
    return base_config(stage, **keys)


# ----------------------------------------------------------------------------- memory readings

def _status_bytes(key: str) -> int:
    """A /proc/self/status memory line ('VmRSS', 'VmHWM') in bytes (0 where there is none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def hwm_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); ru_maxrss reads the same mark."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def _unique_bytes(tree) -> tuple[int, set]:
    import jax
    seen = {}
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            seen[id(x)] = x.nbytes
    return sum(seen.values()), set(seen)


def _live_outside(ids: set) -> int:
    """Bytes of live jax arrays that are not among `ids` (each array once)."""
    import jax
    gc.collect()
    return sum(x.nbytes for x in jax.live_arrays() if id(x) not in ids)


class _Done(Exception):
    pass


class _Stop(Exception):
    pass


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


# ----------------------------------------------------------------------------- worker: one measurement

def measure(spec: dict) -> dict:
    """Run one stage (spec: stage, mode, chunk, steps, updates, dpo_batch, sft_dir, rm_dir, workdir, max_xla_gb) in
    this process; see the module docstring for what is measured."""
    import jax

    from instructgpt_jax import dpo, plan, ppo, sft, sharding, train_lib
    from instructgpt_jax.miniature.world import builtin_rows

    stage, steps = spec["stage"], spec["steps"]
    config = stage_config(stage, spec["mode"], spec["chunk"], steps, spec["sft_dir"], spec["rm_dir"],
                          spec.get("dpo_batch", 2), spec.get("remat", "none"), spec.get("dtype", "float32"))
    rec = {"times": [], "update_times": []}

    def compile_first(jitted, args, program=""):
        """A step's first call: compiled ahead of time (the executable then runs every step: one compilation)
        for XLA's memory analysis; the args' unique bytes and every other live array's bytes, before it runs.
        PPO's two programs (`program` 'policy', 'value') each get theirs; 'xla' is the one whose total is the larger.
        Raises _Stop instead of running a step XLA says needs more than spec['max_xla_gb']."""
        arg_bytes, ids = _unique_bytes(args)
        other_live = _live_outside(ids)
        if "rss_at_first_step" not in rec:
            rec.update(rss_at_first_step=rss_bytes(), peak_rss_before_step=max_rss())
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        rec["compile_s"] = rec.get("compile_s", 0.0) + time.perf_counter() - t0
        m = compiled.memory_analysis()
        step_bytes = arg_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        xla = {"argument": m.argument_size_in_bytes, "argument_unique": arg_bytes,
               "output": m.output_size_in_bytes, "alias": m.alias_size_in_bytes,
               "temp": m.temp_size_in_bytes, "step": step_bytes, "other_live": other_live,
               "total": step_bytes + other_live}
        if program:
            rec.setdefault("xla_programs", {})[program] = xla
        if xla["total"] >= rec.get("xla", {}).get("total", 0):
            rec["xla"] = xla
        rec["peak_rss_compiled"], rec["rss_compiled"] = max_rss(), rss_bytes()
        if xla["total"] > spec.get("max_xla_gb", 1e9) * GB:
            rec["skipped"] = f"not run: XLA needs {xla['total'] / GB:.1f} GB > --max_xla_gb"
            raise _Stop
        return compiled

    # SFT / DPO: the generic train step the stage jits (its `jitted` and bound `frozen` from the closure)
    original_jit_train_step = train_lib.jit_train_step

    def jit_train_step(step_fn, state_shardings, mesh, frozen=None):
        jitted = _closure(original_jit_train_step(step_fn, state_shardings, mesh, frozen))["jitted"]
        box = {}

        def run(state, batch, rng):
            if box:
                return box["compiled"](state, batch, rng, frozen)
            rec["batch_shapes"] = {k: list(v.shape) for k, v in batch.items()}
            box["compiled"] = compile_first(jitted, (state, batch, rng, frozen))
            t0 = time.perf_counter()
            out = jax.block_until_ready(box["compiled"](state, batch, rng, frozen))
            rec["first_run_s"] = time.perf_counter() - t0
            return out
        return run

    # PPO: the jax.jit of `ppo.policy_step` and of `ppo.value_step` (the stage's update: one, then the other), each
    # timed per call (blocking, as the stage does between them); the iteration stops after `spec['updates']`
    # minibatch updates
    original_jit = jax.jit
    programs = {ppo.policy_step: "policy", ppo.value_step: "value"}
    jitted_programs = set()

    def spy_jit(fun, *a, **k):
        jitted = original_jit(fun, *a, **k)
        program = isinstance(fun, functools.partial) and programs.get(fun.func)
        if not program:
            return jitted
        jitted_programs.add(program)
        box = {}

        def call(*args):
            if not box:
                rec.setdefault("rollout_s", time.perf_counter() - rec["t_loop"])
                box["compiled"] = compile_first(jitted, args, program)
            t0 = time.perf_counter()
            out = jax.block_until_ready(box["compiled"](*args))
            if program == "policy":
                rec["update_times"].append(0.0)
            rec["update_times"][-1] += time.perf_counter() - t0
            rec.setdefault("metrics", {}).update({k: float(v) for k, v in jax.device_get(out[1]).items()})
            if program == "value" or "value" not in jitted_programs:  # one minibatch update done
                done = len(rec["update_times"])
                if done == 1:
                    rec["peak_rss_first_update"] = max_rss()
                    if spec.get("updates", 8) > 1:
                        reset_peak()
                if done == spec.get("updates", 8):
                    raise _Stop
            return out
        return call

    def reset_peak():
        """Peak RSS so far kept; the kernel's mark reset so that the following steps' own peak can be read."""
        rec["peak_before_reset"] = max_rss()
        rec["hwm_reset"] = reset_hwm()

    def fit(*, config, mesh, manager, state, step, **_):
        rec["rss_before_loop"] = rss_bytes()
        try:
            with sharding.use(mesh):
                for n in range(1, config.train.num_steps + 1):
                    t0 = rec["t_loop"] = time.perf_counter()
                    try:
                        state, metrics = step(state, n)
                        jax.block_until_ready((state, metrics))
                        rec["metrics"] = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    except _Stop:  # PPO: stopped after spec['updates'] minibatch updates; or a step not run
                        pass
                    rec["times"].append(time.perf_counter() - t0)
                    if "skipped" in rec:
                        break
                    if n == 1 and stage != "ppo" and config.train.num_steps > 1:
                        reset_peak()
            # clear_refs resets ru_maxrss too: the process peak is the larger of the marks before and after
            rec["peak_rss"] = max(rec.get("peak_before_reset", 0), max_rss())
            rec["steady_rss"] = hwm_bytes() if rec.get("hwm_reset") else None
        finally:
            manager.close()
        raise _Done

    original_fit = train_lib.fit
    train_lib.jit_train_step, train_lib.fit, jax.jit = jit_train_step, fit, spy_jit
    train = {"sft": sft.train, "dpo": dpo.train, "ppo": ppo.train}[stage]
    t_start = time.perf_counter()
    try:
        train(config, spec["workdir"], builtin_data=builtin_rows)
        raise RuntimeError(f"{stage}.train returned without running its loop")
    except _Done:
        pass
    finally:
        train_lib.jit_train_step, train_lib.fit, jax.jit = original_jit_train_step, original_fit, original_jit
    p = plan.plan(config, (1, 1, 1), stage=stage)
    times = rec["times"][1:] if stage != "ppo" else []  # step 1 compiles
    keys = ("peak_rss", "steady_rss", "rss_before_loop", "rss_at_first_step", "peak_rss_before_step",
            "peak_rss_compiled", "rss_compiled", "peak_rss_first_update", "compile_s", "first_run_s", "rollout_s",
            "xla", "xla_programs", "skipped", "batch_shapes", "metrics")
    return {**{k: spec[k] for k in ("stage", "mode", "chunk", "steps", "updates")}, "remat": config.model.remat,
            "dtype": config.model.dtype,
            **{k: rec.get(k) for k in keys},
            "plan": {"total": p.total, "resident": p.resident, "phases": p.phases},
            "step_times": rec["times"], "step_s": common.median(times) if times else None,
            "update_times": rec["update_times"],
            "update_s": common.median(rec["update_times"]) if rec["update_times"] else None,
            "wall_s": time.perf_counter() - t_start}


def setup(spec: dict) -> dict:
    """The random-weight SFT export (tokenizer trained on the built-in data) and an RM export from it."""
    from instructgpt_jax import rm, sft
    from instructgpt_jax.miniature.world import builtin_rows
    t0 = time.perf_counter()
    sft.train(base_config("sft", **{"train.num_steps": 0}), spec["sft_dir"], builtin_data=builtin_rows)
    rm.train(base_config("rm", **{"train.num_steps": 0, "init.from_workdir": spec["sft_dir"],
                                  "rm.bias_examples": 16}), spec["rm_dir"], builtin_data=builtin_rows)
    from instructgpt_jax.data.tokenizer import load_tokenizer
    return {"tokenizer_vocab": load_tokenizer(os.path.join(spec["sft_dir"], "export")).vocab_size,
            "seconds": time.perf_counter() - t0}


def time_sft(spec: dict) -> dict:
    """SFT steps of several modes x remats in one process, timed alternately (each stage run up to its loop);
    times keyed 'mode/remat'."""
    import jax

    from instructgpt_jax import sft, sharding, train_lib
    from instructgpt_jax.miniature.world import builtin_rows
    runners = {}
    original = train_lib.fit

    for mode, remat in itertools.product(spec["modes"], spec["remats"]):
        key = f"{mode}/{remat}"

        def fit(*, mesh, manager, state, step, **_):
            manager.close()
            box = {"state": state, "n": 0}

            def run(_rep):
                box["n"] += 1
                with sharding.use(mesh):
                    box["state"], metrics = step(box["state"], box["n"])
                    jax.block_until_ready((box["state"], metrics))
            runners[key] = run
            raise _Done
        train_lib.fit = fit
        config = stage_config("sft", mode, spec["chunk"], 1000, spec["sft_dir"], spec["rm_dir"], remat=remat,
                              dtype=spec["dtype"])
        try:
            sft.train(config, os.path.join(spec["workdir"], f"{mode}_{remat}"), builtin_data=builtin_rows)
        except _Done:
            pass
        finally:
            train_lib.fit = original
        runners[key](-1)  # compile + warm up
    times = common.time_alternately(runners, spec["reps"], settle=spec.get("settle", 0))
    return {"chunk": spec["chunk"], "times": times}


# ----------------------------------------------------------------------------- parent

def run_child(kind: str, spec: dict, max_rss_gb: float, verbose: bool) -> tuple[dict | None, str]:
    """One subprocess; returns (its result, or None, and a reason). Kills it above max_rss_gb of RSS."""
    cmd = [sys.executable, HERE, f"--_{kind}", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    err = None if verbose else subprocess.PIPE
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    import threading
    tails, killed = [], {}

    def drain():
        if proc.stderr is not None:
            for line in proc.stderr:
                tails.append(line)
                del tails[:-30]
    th = threading.Thread(target=drain, daemon=True)
    th.start()
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        peak = max(peak, rss)
                        if rss > max_rss_gb * GB:
                            killed["rss"] = rss
                            proc.kill()
        except OSError:
            pass
        time.sleep(0.1)
    out = proc.stdout.read()
    th.join(timeout=5)
    if killed:
        return None, f"killed: RSS > {max_rss_gb:g} GB"
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    reason = (tails[-1].strip() if tails else f"exit status {proc.returncode}")[:200]
    if not verbose:
        sys.stderr.write("".join(tails))
    return None, f"failed: {reason}"


def gb(x) -> str:
    return "-" if x is None else f"{x / GB:.2f}"


def lm_head_tokens(stage: str, dpo_batch: int) -> int:
    """The most tokens (rows x positions) any LM-head call of the stage covers here: a logits_chunk at least this
    large chunks nothing (`scoring.token_stats` runs unchunked when B x N <= C), the same program as 0."""
    config = stage_config(stage, "full", 0, 1, "", "", dpo_batch)
    if stage == "ppo":
        return max(config.ppo.minibatch_size * config.ppo.max_new_tokens,
                   config.ppo.ptx_batch_size * config.data.ptx_seq_len)
    rows = config.train.batch_size * (config.data.max_k if stage == "dpo" else 1)
    return rows * (config.data.seq_len - (stage == "dpo"))  # DPO scores tokens 1..T-1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="sft,dpo,ppo")
    parser.add_argument("--modes", default="full,lora,nf4")
    parser.add_argument("--chunks", default="0,512", help="model.logits_chunk values")
    parser.add_argument("--remats", default="none,full", help="model.remat values")
    parser.add_argument("--dtype", default="float32", help="model.dtype (compute; params stay float32)")
    parser.add_argument("--steps", type=int, default=2, help="SFT steps per measurement (the first compiles)")
    parser.add_argument("--dpo_steps", type=int, default=1, help="DPO steps per measurement (the first compiles)")
    parser.add_argument("--dpo_batch", type=int, default=2, help="DPO prompts per step (x 9 completions)")
    parser.add_argument("--ppo_updates", type=int, default=1,
                        help="stop the PPO iteration after this many of its 8 minibatch updates (8 = all)")
    parser.add_argument("--time_reps", type=int, default=3, help="timed SFT steps per mode in the timing run")
    parser.add_argument("--time_chunk", type=int, default=512, help="logits_chunk of the timing run")
    parser.add_argument("--time_remat", default="none,full", help="model.remat values of the timing run")
    parser.add_argument("--no-time", action="store_true", help="skip the alternating SFT timing run")
    parser.add_argument("--cores", type=int, default=0, help="pin every subprocess to this many cores (0 = all)")
    parser.add_argument("--settle", type=int, default=0, help="untimed steps of a mode before each timed one")
    parser.add_argument("--max_xla_gb", type=float, default=16.0,
                        help="compile but do not run a step whose XLA total exceeds this (its figures are reported)")
    parser.add_argument("--max_rss_gb", type=float, default=20.0, help="kill a measurement above this RSS")
    parser.add_argument("--workdir", default="", help="keep the exports here (reused when present)")
    parser.add_argument("--out", default="", help="also write every number as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show the stages' output")
    for kind in ("measure", "setup", "time"):
        parser.add_argument(f"--_{kind}", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    for kind, fn in (("measure", measure), ("setup", setup), ("time", time_sft)):
        spec = getattr(args, f"_{kind}")
        if spec is not None:
            print("RESULT " + json.dumps(fn(json.loads(spec))), flush=True)
            return

    t_all = time.perf_counter()
    common.pin_cores(args.cores)
    root = args.workdir or tempfile.mkdtemp(prefix="memory_bench_")
    sft_dir, rm_dir = os.path.join(root, "sft"), os.path.join(root, "rm")
    print(common.machine_line(torch_too=False))
    modes, remats, chunks = args.modes.split(","), args.remats.split(","), [int(c) for c in args.chunks.split(",")]
    child = functools.partial(run_child, max_rss_gb=args.max_rss_gb, verbose=args.verbose)
    if not (os.path.exists(os.path.join(sft_dir, "export")) and os.path.exists(os.path.join(rm_dir, "export"))):
        shutil.rmtree(sft_dir, ignore_errors=True)
        shutil.rmtree(rm_dir, ignore_errors=True)
        res, why = child("setup", {"sft_dir": sft_dir, "rm_dir": rm_dir})
        if res is None:
            raise SystemExit(f"setup {why}")
        setup_note = (f"tokenizer {res['tokenizer_vocab']} tokens (SentencePiece trained on the built-in data), "
                      f"model.vocab_size 49152; exports written in {res['seconds']:.0f} s")
    else:
        setup_note = f"exports reused from {root}"
    print(f"{PRESET} (llama, 30 layers, d_model 576, vocab 49152, tied), random weights, {args.dtype} compute; "
          f"{setup_note}.\n"
          f"sft: 16 rows x 128 tokens, {args.steps} step(s); dpo: {args.dpo_batch} prompts x 9 completions x 128 "
          f"tokens, {args.dpo_steps} step(s); ppo: one PPO-ptx iteration's rollout (32 x 64 prompt + 64 sampled "
          f"tokens) and the first {args.ppo_updates} of its 8 minibatch updates (8 rollouts + 32 ptx rows of "
          f"128 tokens each). The first step compiles. GB = 1e9 bytes.\n")
    table = common.Table(["stage", "mode", "remat", "logits_chunk", "RSS at step GB", "peak RSS GB", "XLA temp GB",
                          "XLA total GB", "plan GB", "plan / XLA", "time s"])
    results, done = [], {}
    for stage in args.stages.split(","):
        tokens = lm_head_tokens(stage, args.dpo_batch)
        for mode, remat, chunk in itertools.product(modes, remats, chunks):
            label = [stage, MODE_LABEL[mode], remat, chunk]
            effective = 0 if chunk >= tokens else chunk
            if (stage, mode, remat, effective) in done:
                table.row(label + [f"= logits_chunk {done[stage, mode, remat, effective]} (the same program: "
                                   f"<= {tokens} tokens per LM-head call)"] + [""] * 6)
                continue
            done[stage, mode, remat, effective] = chunk
            work = tempfile.mkdtemp(prefix=f"{stage}_{mode}_{remat}_{chunk}_", dir=root)
            steps = {"sft": args.steps, "dpo": args.dpo_steps, "ppo": 1}[stage]
            spec = dict(stage=stage, mode=mode, remat=remat, dtype=args.dtype, chunk=chunk, steps=steps,
                        sft_dir=sft_dir, rm_dir=rm_dir, workdir=work, updates=args.ppo_updates,
                        dpo_batch=args.dpo_batch, max_xla_gb=args.max_xla_gb)
            res, why = child("measure", spec)
            shutil.rmtree(work, ignore_errors=True)
            if res is None:
                table.row(label + [why] + [""] * 6)
                results.append(dict(spec, error=why))
                continue
            x, p = res["xla"], res["plan"]["total"]
            if res.get("skipped"):
                t = "-"
            elif stage == "ppo":
                t = f"{res['rollout_s']:.0f} + {res['update_s']:.0f} per update"
            else:
                t = f"{res['step_s'] if res['step_s'] is not None else res['first_run_s']:.1f}"
            peak = res["skipped"] if res.get("skipped") else gb(res["peak_rss"])
            table.row(label + [gb(res["rss_at_first_step"]), peak, gb(x["temp"]), gb(x["total"]), gb(p),
                               f"{p / x['total']:.2f}", t])
            results.append(res)

    timing = None
    time_modes, time_remats = [m for m in ("full", "lora", "nf4") if m in modes], args.time_remat.split(",")
    if not args.no_time and len(time_modes) * len(time_remats) > 1:
        res, why = child("time", {"modes": time_modes, "remats": time_remats, "chunk": args.time_chunk,
                                  "reps": args.time_reps, "dtype": args.dtype, "settle": args.settle,
                                  "sft_dir": sft_dir, "rm_dir": rm_dir,
                                  "workdir": tempfile.mkdtemp(prefix="time_", dir=root)})
        print(f"\nSFT step (16 x 128 tokens), alternating in one process (logits_chunk {args.time_chunk}, "
              f"{args.time_reps} timed steps each after one warm-up step; seconds, median (min-max)):\n")
        t2 = common.Table(["mode", "remat", "step s", "/ full fine-tuning, same remat"])
        if res is None:
            t2.row(["all", "", why, ""])
        else:
            timing = res
            for key, ts in res["times"].items():
                mode, remat = key.split("/")
                base = res["times"].get(f"full/{remat}")
                t2.row([MODE_LABEL[mode], remat, common.cell(ts, "{:.2f}"),
                        f"{common.median(ts) / common.median(base):.2f}x" if base else "-"])

    print("\ntargets:")
    for r in results:
        if r.get("stage") != "ppo" or r["mode"] not in TARGETS or "xla" not in r:
            continue
        goal = TARGETS[r["mode"]]
        if r.get("skipped"):
            verdict = f"not run; XLA alone needs {gb(r['xla']['total'])} GB: MISSED"
        else:
            verdict = f"peak RSS {gb(r['peak_rss'])} GB: {'met' if r['peak_rss'] <= goal * GB else 'MISSED'}"
        print(f"  PPO-ptx {MODE_LABEL[r['mode']]}, remat {r['remat']}, logits_chunk {r['chunk']}: <= {goal:g} GB peak RSS; {verdict}")
    for r in results:
        if "xla" in r:
            ratio = r["plan"]["total"] / r["xla"]["total"]
            print(f"  plan within 25 % of XLA, {r['stage']} {MODE_LABEL[r['mode']]} remat {r['remat']} "
                  f"logits_chunk {r['chunk']}: "
                  f"plan / XLA {ratio:.2f}: {'met' if abs(ratio - 1) <= 0.25 else 'MISSED'}")
    for key, ts in (timing or {}).get("times", {}).items():
        mode, remat = key.split("/")
        if mode != "full" and f"full/{remat}" in timing["times"]:
            ratio = common.median(ts) / common.median(timing["times"][f"full/{remat}"])
            print(f"  SFT step {MODE_LABEL[mode]}, remat {remat}, <= 1.2x full fine-tuning's: {ratio:.2f}x"
                  + (f": {'met' if ratio <= 1.2 else 'MISSED'}" if mode == "lora" else " (no target; for scale)"))
    total = time.perf_counter() - t_all
    print(f"\ntotal {total / 60:.1f} min")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": common.machine_line(torch_too=False), "args": {
                k: v for k, v in vars(args).items() if not k.startswith("_")}, "results": results,
                "timing": timing, "seconds": total}, f, indent=1)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
