"""Pieces every benchmark shares: the machine line, thread settings, identical weights in both
frameworks, alternating timing and the markdown table.

Timing protocol (all benchmarks): every contender is compiled / warmed up first, then the
contenders run alternately, one repetition each in turn (the order flips every repetition), so
that drift in the machine's load hits all of them alike; each timed call follows `--settle` (default
1) untimed calls of the same contender (see `time_alternately`). Tables give the median and the
min-max spread over the repetitions.
"""
from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

import jax
import jax.numpy as jnp
import numpy as np


def cpu_count() -> int:
    """Cores this process may run on: XLA:CPU sizes its intra-op thread pool to this."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def pin_cores(n: int) -> int:
    """Restrict this process to `n` of its available cores (0 = all), BEFORE jax or torch start
    their thread pools: XLA:CPU sizes its pool from the affinity mask and `set_torch_threads`
    follows it, so both frameworks then use exactly `n` threads. Returns the core count in use.

    Why: on a machine shared with other jobs, an OpenMP runtime (torch) with as many threads as
    cores degrades far more than XLA's pool when a core is taken away mid-region, so a
    `--cores 1` run is the load-insensitive cross-check of a `--cores 2` run."""
    if n:
        avail = sorted(os.sched_getaffinity(0))
        if n > len(avail):
            raise SystemExit(f"--cores {n}: only {len(avail)} cores available")
        os.sched_setaffinity(0, set(avail[:n]))
    return cpu_count()


def add_cores_flag(parser):
    parser.add_argument("--cores", type=int, default=0,
                        help="pin the process to this many cores (0 = all); both frameworks use one thread per core")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls of the same contender before each timed one (see time_alternately)")


def set_torch_threads():
    """Give torch the same number of intra-op threads as XLA uses (one per available core)."""
    import torch
    n = cpu_count()
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def vector_extensions() -> str:
    """The CPU's SIMD extensions that decide matmul speed (AVX2, FMA, AVX-512 subsets, AMX): the same code measured
    1.76x torch eager on a Zen 5 with AVX-512 and 0.83-0.96x on a Zen 3 without it, so a ratio needs them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = [x for x in flags if x in ("avx2", "fma") or x.startswith(("avx512", "amx"))]
    return " ".join(sorted(wanted)) or "no AVX2 / AVX-512"


def machine_line(torch_too: bool = True) -> str:
    parts = [f"{cpu_model()}, {cpu_count()} cores ({vector_extensions()})",
             f"jax {jax.__version__} ({jax.devices()[0].platform})"]
    if torch_too:
        import torch
        import transformers
        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
                     f"transformers {transformers.__version__}")
    try:
        parts.append(f"load avg {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "machine: " + " | ".join(parts)


def model_line(cfg) -> str:
    return (f"{cfg.num_layers} layers, d_model {cfg.d_model}, {cfg.num_heads} heads, mlp {cfg.mlp_dim}, "
            f"vocab {cfg.vocab_size}, float32")


# ----------------------------------------------------------------------------- models

def model_config(preset: str, **overrides):
    """Our ModelConfig for a preset name ('tiny' = the ModelConfig defaults' preset, 'gpt2' = GPT-2 124M), with
    remat 'none' unless overridden: the references keep every activation too (the full-size presets default
    to remat='full' for memory)."""
    import dataclasses

    from instructgpt_jax import config_lib
    from instructgpt_jax.models import ModelConfig
    cfg = ModelConfig.from_config(config_lib.model_config(preset))
    return dataclasses.replace(cfg, **{"remat": "none", **overrides})


def random_params(model, seed: int = 0):
    """Plain (unboxed) float32 params of our model."""
    import flax.linen as nn
    return jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]))(
        jax.random.PRNGKey(seed))


def prompts(batch: int, length: int, vocab: int, seed: int = 0):
    """Left-padded random prompts ([B, P] int32 tokens and mask) with real lengths P/2..P; pads are 0."""
    rs = np.random.RandomState(seed)
    starts = rs.randint(0, length // 2 + 1, size=(batch, 1))
    mask = (np.arange(length)[None] >= starts).astype(np.int32)
    return np.where(mask == 1, rs.randint(1, vocab, size=mask.shape), 0).astype(np.int32), mask


def to_transformers(model, params, tmpdir: str, head: str = "lm"):
    """The same weights as a transformers model: `hf.save_pretrained` to `tmpdir`, then `from_pretrained`.

    head 'lm': GPT2LMHeadModel. head 'scalar' (our reward / value model): GPT2ForSequenceClassification
    with num_labels 1, whose `score` is a Linear(d_model, 1) *without* bias (our scalar head's bias is
    dropped; it only shifts every value by a constant, which the benchmark does not care about).
    """
    import torch
    import transformers
    from safetensors.numpy import load_file

    from instructgpt_jax import hf
    transformers.logging.set_verbosity_error()  # e.g. GPT-2's default bos/eos ids outside a tiny vocabulary
    transformers.utils.logging.disable_progress_bar()
    if head == "lm":
        hf.save_pretrained(model, params, tmpdir)
        return transformers.GPT2LMHeadModel.from_pretrained(tmpdir, dtype=torch.float32)
    hf.save_pretrained(model, params, tmpdir, trunk_only=True)
    base = transformers.GPT2Model.from_pretrained(tmpdir, dtype=torch.float32)
    config = transformers.GPT2Config.from_pretrained(tmpdir, num_labels=1, pad_token_id=0)
    out = transformers.GPT2ForSequenceClassification(config)
    out.transformer.load_state_dict(base.state_dict())
    score = load_file(os.path.join(tmpdir, hf.SCORE_FILE))
    with torch.no_grad():
        out.score.weight.copy_(torch.from_numpy(score["score.weight"]))
    return out.to(torch.float32)


def train_step_runner(loss_fn, params, tx, mesh, frozen=None):
    """`run(batch) -> loss` making one optimizer step exactly as the supervised stages run theirs
    (`train_lib.run_supervised`): the generic `train_lib.train_step` on `loss_fn`, jitted on `mesh` with
    explicit shardings and the state (built from `params`, which it consumes) donated. `batch` is global
    (`sharding.host_to_global`); the host read of the loss blocks, as a training loop's logging would.
    `frozen`: bound to the step as the stages bind theirs (LoRA: `(base, None)` with `lora.with_base(loss_fn)`)."""
    from instructgpt_jax import sharding, train_lib
    state, shardings = sharding.place(train_lib.new_state(params, tx), mesh)
    step = train_lib.jit_train_step(functools.partial(train_lib.train_step, loss_fn=loss_fn, tx=tx), shardings, mesh,
                                    frozen)
    rng, box = jax.random.PRNGKey(1), {"state": state}

    def run(batch):
        with sharding.use(mesh):
            box["state"], metrics = step(box["state"], batch, rng)
        return float(metrics["loss"])

    return run


# ----------------------------------------------------------------------------- timing

def time_alternately(fns: dict[str, Callable[[int], object]], reps: int, settle: int = 1) -> dict[str, list[float]]:
    """Run each `fn(rep)` `reps` times, one of each in turn (order reversed on odd repetitions).

    Each timed call follows `settle` untimed calls `fn(-1)` of the same contender: a call that
    directly follows the other framework's pays for its memory churn (measured: our GPT-2 SFT step
    takes 3.3 s after one of our own steps and 4.5-5.6 s right after a torch step, its system time
    going from 0.9 s to 3-5 s in page faults), while a training or sampling loop runs one
    framework's calls back to back. Each fn must block until its work is done. Returns name -> list
    of wall seconds.
    """
    names = list(fns)
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in (names if rep % 2 == 0 else names[::-1]):
            for _ in range(settle):
                fns[n](-1)
            t0 = time.perf_counter()
            fns[n](rep)
            times[n].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def cell(xs, fmt: str = "{:,.0f}") -> str:
    """'median (min-max)'."""
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


class Table:
    """A markdown table printed as it fills: the header at once, then each row when it is measured."""

    def __init__(self, header: list[str], align: str | None = None):
        align = align or "l" + "r" * (len(header) - 1)
        print("| " + " | ".join(header) + " |")
        print("| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |", flush=True)

    def row(self, cells: list) -> None:
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
