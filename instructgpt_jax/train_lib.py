"""Pieces every stage's loop shares: optimizer and schedule, gradient accumulation, metric
writers, the progress output, the NaN guard and the clean stop on SIGINT / SIGTERM. Stage files
wire these; they own no logic here."""
from __future__ import annotations

import datetime
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from instructgpt_jax import checkpoints, sharding


# ----------------------------------------------------------------------------- optimizer

def lr_schedule(optim_cfg, num_steps: int, updates_per_step: int = 1) -> optax.Schedule:
    """Linear warmup from warmup_init_frac * lr, then cosine decay to end_lr_frac * lr.

    `num_steps` and `optim_cfg.warmup_steps` (or `warmup_frac` of num_steps) count stage steps; the schedule is evaluated once per
    optimizer update, and a PPO iteration makes `updates_per_step` of them (minibatches x epochs), so
    both are scaled: the paper's "10-iteration warmup" lasts 10 iterations, not 10 minibatches.
    """
    peak = optim_cfg.lr
    frac = optim_cfg.get("warmup_frac", 0.0)  # a fraction of the run (the finetune presets') or a step count
    warmup_steps = math.ceil(frac * num_steps) if frac > 0 else int(optim_cfg.warmup_steps)
    total, warmup = num_steps * updates_per_step, warmup_steps * updates_per_step
    cosine = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=optim_cfg.end_lr_frac)
    if warmup <= 0:
        return cosine
    ramp = optax.linear_schedule(peak * optim_cfg.warmup_init_frac, peak, warmup)
    return optax.join_schedules([ramp, cosine], [warmup])


def make_optimizer(optim_cfg, num_steps: int, updates_per_step: int = 1) -> optax.GradientTransformation:
    """AdamW (paper: b1 0.9, b2 0.95) with global-norm clipping; no weight decay on biases / norms."""
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim > 1 and "norm" not in jax.tree_util.keystr(path), params)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(optim_cfg, num_steps, updates_per_step), b1=optim_cfg.b1, b2=optim_cfg.b2,
                             eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def new_state(params, tx) -> dict:
    """A supervised train state: step counter, params, optimizer state sharded like the params."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": sharding.init_optimizer(tx, params)}


def apply_gradients(part: dict, grads, tx) -> dict:
    """{params, opt_state} after one optimizer update."""
    updates, opt_state = tx.update(grads, part["opt_state"], part["params"])
    return dict(part, params=optax.apply_updates(part["params"], updates), opt_state=opt_state)


# ----------------------------------------------------------------------------- gradients

def accumulate_gradients(loss_fn: Callable, params: Any, batch: dict, rng: jax.Array, grad_accum: int):
    """Gradients of a weighted-mean loss over `grad_accum` microbatches, inside the jitted step.

    `loss_fn(params, microbatch, rng) -> (loss, aux)` where aux['weight'] is the count the loss
    is a mean over (tokens, prompts with pairs, ...). Combining microbatch means with these
    weights gives exactly the full-batch mean, so accumulation changes memory, not the result.
    Returns (loss, aux, grads); aux values are weight-averaged too.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if grad_accum <= 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return loss, aux, grads

    def split(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch of {x.shape[0]} rows per step is not divisible by "
                             f"config.train.grad_accum={grad_accum}")
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    micro = jax.tree.map(split, batch)
    rngs = jax.random.split(rng, grad_accum)

    def body(carry, xs):
        mb, r = xs
        (loss, aux), g = grad_fn(params, mb, r)
        w = jnp.asarray(aux["weight"], jnp.float32)
        acc_g, acc_loss, acc_aux, acc_w = carry
        acc_g = jax.tree.map(lambda a, b: a + w * b, acc_g, g)
        acc_aux = jax.tree.map(lambda a, b: a + w * b, acc_aux, aux)
        return (acc_g, acc_loss + w * loss, acc_aux, acc_w + w), None

    aux_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rngs[0])[0][1])
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shape), jnp.zeros((), jnp.float32))
    (g, loss, aux, w), _ = jax.lax.scan(body, init, (micro, rngs))
    w_safe = jnp.maximum(w, 1e-8)
    aux = jax.tree.map(lambda a: a / w_safe, aux)
    aux["weight"] = w
    return loss / w_safe, aux, jax.tree.map(lambda a: a / w_safe, g)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- the generic step

def train_step(state, batch, rng, frozen=None, *, loss_fn, tx, grad_accum: int = 1):
    """One optimizer step of any objective: (state, batch, rng[, frozen]) -> (state, metrics). Pure.

    `loss_fn(params, batch, rng, frozen) -> (loss, aux)`: `rng` is None in evaluation (no dropout),
    `frozen` holds models that are not trained (a DPO reference, ...) and is passed through as an
    argument, never baked into the program. aux['weight'] is the count the loss is a mean over; the
    other aux entries are metrics (weight-averaged over microbatches).
    """
    rng = jax.random.fold_in(rng, state["step"])
    fn = lambda p, b, r: loss_fn(p, b, r, frozen)  # noqa: E731
    loss, aux, grads = accumulate_gradients(fn, state["params"], batch, rng, grad_accum)
    state = dict(apply_gradients(state, grads, tx), step=state["step"] + 1)
    metrics = {"loss": loss, "grad_norm": global_norm(grads),
               **{k: v for k, v in aux.items() if k != "weight" and not k.endswith("_weight")}}
    return state, metrics


def eval_step(params, batch, frozen=None, *, loss_fn):
    """Weighted sums of the loss and metrics over one batch (added up over an eval split).
    A metric `m` is weighted by aux['m_weight'] when given (e.g. accuracy over pairs), else by aux['weight']."""
    loss, aux = loss_fn(params, batch, None, frozen)
    w = aux["weight"]
    sums = {"loss": loss * w, "weight": w}
    for k, v in aux.items():
        if k != "weight" and not k.endswith("_weight"):
            sums[k] = v * aux.get(f"{k}_weight", w)
            sums[f"{k}_weight"] = aux.get(f"{k}_weight", w)
    return sums


def jit_eval_step(loss_fn, mesh):
    return jax.jit(functools.partial(eval_step, loss_fn=loss_fn), out_shardings=sharding.replicated(mesh))


def evaluate(eval_fn, params, batches, mesh, max_batches: int = 0, frozen=None) -> dict:
    """'eval_<metric>' means over the first `max_batches` batches (0 = all) of an eval iterator."""
    totals = sum_over_batches(lambda p, b: eval_fn(p, b, frozen), params, batches, mesh, max_batches)
    if not totals:
        return {}
    out = {"eval_loss": totals["loss"] / max(totals["weight"], 1e-8)}
    for k, v in totals.items():
        if k not in ("loss", "weight") and not k.endswith("_weight"):
            out[f"eval_{k}"] = v / max(totals[f"{k}_weight"], 1e-8)
    return out


def sum_over_batches(eval_fn, params, batches, mesh, max_batches: int = 0) -> dict:
    """Add up `eval_fn(params, batch)` dicts of sums over an eval iterator (first `max_batches`)."""
    totals = None
    for i, batch in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = eval_fn(params, sharding.host_to_global(batch, mesh))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    return {} if totals is None else {k: float(v) for k, v in jax.device_get(totals).items()}


# ----------------------------------------------------------------------------- metrics

class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard event files (tensorboardX, TF-free).

    On resume, records past the resumed step are dropped first so that the file reads as one run.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in metrics.items():
            v = float(np.asarray(v))
            record[k] = v
            self.tb.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self):
        if self.enabled:
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """Where the loop is, on stderr of process 0: a tqdm bar with ETA when `enabled` and stderr is a
    terminal; otherwise (SLURM / nohup logs, or the bar turned off) one plain line every `log_every`
    steps and at the end, e.g. `sft: step 20/60 loss=1.234 4.52 steps/s ETA 0:00:09`, so a log
    file gets readable lines instead of carriage-return bar redraws."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, log_every: int = 1):
        self.on = jax.process_index() == 0
        self.desc, self.total, self.step, self.log_every = desc, total, initial, max(int(log_every), 1)
        self.bar = None
        if self.on and enabled and sys.stderr.isatty():
            self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr)
        self._t = self._n = None  # speed is measured from the end of the first step: compiling does not count

    def log(self, message: str):
        """A line of its own (above the bar, if there is one)."""
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif self.on:
            print(message, file=sys.stderr, flush=True)

    def update(self, n: int = 1, **postfix):
        self.step += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self._t is None:
            self._t, self._n = now, self.step
        if self.on and (self.step % self.log_every == 0 or self.step == self.total):
            done, seconds = self.step - self._n, now - self._t
            shown = " ".join(f"{k}={float(v):.4g}" for k, v in postfix.items())
            line = f"{self.desc}: step {self.step}/{self.total}" + (f" {shown}" if shown else "")
            if done > 0 and seconds > 0:
                rate = done / seconds
                speed = f"{rate:.3g} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step"
                eta = datetime.timedelta(seconds=round((self.total - self.step) / rate))
                line += f" {speed} ETA {eta}"
            self.log(line)
            self._t, self._n = now, self.step

    def close(self):
        if self.bar is not None:
            self.bar.close()


class Throughput:
    """Tokens (or other units) per second between two log points."""

    def __init__(self):
        self.t, self.n = time.perf_counter(), 0

    def add(self, n: float):
        self.n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return r


def check_finite(step: int, metrics: dict, keys=("loss",)) -> None:
    """Stop on NaN/inf before anything is saved, naming the step; the last good checkpoint stays."""
    for k in keys:
        if k in metrics and not math.isfinite(float(np.asarray(metrics[k]))):
            raise FloatingPointError(
                f"{k} is {float(np.asarray(metrics[k]))} at step {step}; stopping. The last good checkpoint "
                f"is kept; lower config.optim.lr or check the data.")


# ----------------------------------------------------------------------------- clean stop

class Interrupted(Exception):
    """SIGINT / SIGTERM stopped training after `step`, whose checkpoint (with the data position) is
    saved: rerunning the same command resumes there. Not a user error and not a bug."""

    def __init__(self, step: int, signum: int, workdir: str):
        self.step, self.signum, self.workdir = step, signum, workdir
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved "
                         f"in {workdir}; rerun the same command to resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal killed: 130, 143


class StopRequest:
    """While active (a context manager), SIGINT / SIGTERM only set `signum`, so the loop can end the
    current step and save it. After the first signal the default handlers return, so a second Ctrl-C
    kills at once (Orbax writes a checkpoint to a temporary directory and renames it, so a killed save
    leaves no half checkpoint). Signal handlers exist only in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self._previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        del frame
        self.signum = signum
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def agreed(self) -> int:
        """The signal to stop on, the same on every process (0: go on). With several processes a stop on
        one is a stop on all at the same step, else they would hang in the next step's collectives."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils
        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


# ----------------------------------------------------------------------------- the loop

def place_and_resume(state, mesh, manager, set_data_state: Callable[[dict], None]):
    """Put a fresh state on the mesh; if the workdir holds a checkpoint, restore it onto the same
    shardings (any mesh) and hand the saved data position to `set_data_state`. Returns (state, shardings)."""
    state, shardings = sharding.place(state, mesh)
    if manager.latest_step() is not None:
        state, data_state = manager.restore(checkpoints.abstract_like(state, shardings))
        set_data_state(data_state)
    return state, shardings


def jit_train_step(step_fn, state_shardings, mesh, frozen=None):
    """`step_fn(state, batch, rng, frozen)` jitted with explicit shardings and the state donated;
    returns `step(state, batch, rng)` with the frozen models (already on the mesh) bound."""
    repl = sharding.replicated(mesh)
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, None, repl, None),
                     out_shardings=(state_shardings, repl), donate_argnums=0)
    return lambda state, batch, rng: jitted(state, batch, rng, frozen)


def batches_step(step_fn, train_iter, mesh, rng):
    """A loop step that feeds the next batch of `train_iter` to a jitted train step."""
    return lambda state, step: step_fn(state, sharding.host_to_global(next(train_iter), mesh), rng)


def fit(*, config, workdir: str, mesh, manager, state, step, data_state: Callable[[], dict],
        evaluate_fn: Callable | None = None, units_per_step: float = 0, units: str = "tokens",
        finite_keys=("loss",), shown=("loss",), updates_per_step: int = 1, tasks_fn: Callable | None = None):
    """The loop every stage shares: step, log, evaluate, checkpoint, progress output, clean shutdown.

    `step(state, step_number) -> (state, metrics)` runs one stage step (an optimizer step, or a whole
    PPO iteration of `updates_per_step` optimizer updates); metrics are fetched from the device only on
    log steps, with the lr of the step's last update. `evaluate_fn(state) -> dict` runs every
    `train.eval_every` steps and at the end; `tasks_fn(state) -> dict` (lm-eval tasks, `harness.Stage.tasks`)
    every `train.eval_tasks_every` steps and at the end. `data_state()` is saved with each checkpoint.
    SIGINT / SIGTERM end the current step, save its checkpoint and raise `Interrupted`.
    Returns (final state, last logged metrics).
    """
    start, total = int(state["step"]), config.train.num_steps
    schedule = lr_schedule(config.optim, total, updates_per_step)
    writer = MetricWriter(workdir, resume_step=start)
    progress = Progress(total, start, config.stage, config.train.progress, config.train.log_every)
    speed = Throughput()
    last = {}
    try:
        with StopRequest() as stop_request, sharding.use(mesh):
            for n in range(start + 1, total + 1):
                if n == start + 1:  # say why the first step takes long
                    progress.log(f"{config.stage}: compiling the train step (first step)...")
                    t0 = time.perf_counter()
                state, metrics = step(state, n)
                if n == start + 1:
                    jax.block_until_ready(metrics)
                    progress.log(f"{config.stage}: first step compiled and run in {time.perf_counter() - t0:.1f}s")
                speed.add(units_per_step)
                is_last = n == total
                every = config.train.get("eval_tasks_every", 0)
                tasks_due = tasks_fn is not None and (is_last or (every and n % every == 0))
                if n % config.train.log_every == 0 or is_last or tasks_due:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(n, last, finite_keys)
                    last["lr"] = float(schedule(n * updates_per_step - 1))
                    if units_per_step:
                        last[f"{units}_per_sec"] = speed.rate()
                    if evaluate_fn is not None and (is_last or (config.train.eval_every
                                                                and n % config.train.eval_every == 0)):
                        last.update(evaluate_fn(state))
                    if tasks_due:
                        last.update(tasks_fn(state))
                    writer.write(n, last)
                progress.update(1, **{k: last[k] for k in shown if k in last})
                stop = stop_request.agreed()
                if n % config.train.checkpoint_every == 0 or is_last or stop:
                    check_finite(n, jax.device_get(metrics), finite_keys)  # never save a NaN state
                    manager.save(n, state, data_state(), force=is_last or bool(stop))
                if stop:
                    manager.wait()
                    raise Interrupted(n, stop, workdir)
    finally:  # also on Ctrl-C / errors: finish in-flight async saves so the last good one is complete
        progress.close()
        manager.close()
        writer.close()
    return state, last


def run_supervised(*, config, workdir: str, mesh, manager, params, tx, loss_fn, data, rng, units_per_step: float,
                   frozen=None, tasks_fn=None):
    """Step + loop of a stage that trains one params tree on batches (SFT, pretraining, RM, DPO).

    The train state starts from `params` (or the workdir's checkpoint, with the data position), the
    generic `train_step` is jitted on `loss_fn` with `frozen` bound, and `fit` runs it, evaluating on
    `data`'s eval split every `train.eval_every` steps and at the end. Returns (state, last metrics)."""
    train_iter = data.train_iterator()
    state, shardings = place_and_resume(new_state(params, tx), mesh, manager, train_iter.set_state)
    step_fn = jit_train_step(functools.partial(train_step, loss_fn=loss_fn, tx=tx, grad_accum=config.train.grad_accum),
                             shardings, mesh, frozen)
    eval_fn = jit_eval_step(loss_fn, mesh)
    return fit(config=config, workdir=workdir, mesh=mesh, manager=manager, state=state,
               step=batches_step(step_fn, train_iter, mesh, rng), data_state=train_iter.get_state,
               units_per_step=units_per_step, tasks_fn=tasks_fn,
               evaluate_fn=lambda s: evaluate(eval_fn, s["params"], data.eval_iterator(), mesh,
                                              config.train.eval_batches, frozen))
