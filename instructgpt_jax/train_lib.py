"""Pieces every stage's loop shares: optimizer and schedule, gradient accumulation, metric
writers, the progress bar, and the NaN guard. Stage files wire these; they own no logic here."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from instructgpt_jax import checkpoints, sharding


# ----------------------------------------------------------------------------- optimizer

def lr_schedule(optim_cfg, num_steps: int) -> optax.Schedule:
    """Linear warmup from warmup_init_frac * lr, then cosine decay to end_lr_frac * lr."""
    peak = optim_cfg.lr
    warmup = int(optim_cfg.warmup_steps)
    cosine = optax.cosine_decay_schedule(peak, max(num_steps - warmup, 1), alpha=optim_cfg.end_lr_frac)
    if warmup <= 0:
        return cosine
    ramp = optax.linear_schedule(peak * optim_cfg.warmup_init_frac, peak, warmup)
    return optax.join_schedules([ramp, cosine], [warmup])


def make_optimizer(optim_cfg, num_steps: int) -> optax.GradientTransformation:
    """AdamW (paper: b1 0.9, b2 0.95) with global-norm clipping; no weight decay on biases / norms."""
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: x.ndim > 1 and "norm" not in jax.tree_util.keystr(path), params)
    parts = []
    if optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(optim_cfg, num_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                             eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


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
    """tqdm bar with ETA (only on process 0, only when enabled)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                             disable=not enabled or jax.process_index() != 0)

    def update(self, n: int = 1, **postfix):
        if postfix:
            self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self):
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


# ----------------------------------------------------------------------------- the loop

def place_and_resume(state, mesh, manager, train_iter):
    """Put a fresh state on the mesh; if the workdir holds a checkpoint, restore it onto the same
    shardings (any mesh) together with the data position. Returns (state, shardings)."""
    state, shardings = sharding.place(state, mesh)
    if manager.latest_step() is not None:
        state, data_state = manager.restore(checkpoints.abstract_like(state, shardings))
        train_iter.set_state(data_state)
    return state, shardings


def jit_train_step(step_fn, state_shardings, mesh):
    """`step_fn(state, batch, rng)` jitted with explicit shardings and the state donated."""
    repl = sharding.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_shardings, None, repl), out_shardings=(state_shardings, repl),
                   donate_argnums=0)


def fit(*, config, workdir: str, mesh, manager, state, step_fn, train_iter, evaluate_fn, rng,
        tokens_per_step: int):
    """The supervised loop shared by pretrain / SFT / RM: step, log, evaluate, checkpoint.

    `step_fn(state, global_batch, rng) -> (state, metrics)` is jitted with donated state;
    `evaluate_fn(params) -> dict` returns eval metrics. Returns (final state, last logged metrics).
    """
    start, total = int(state["step"]), config.train.num_steps
    schedule = lr_schedule(config.optim, total)
    writer = MetricWriter(workdir, resume_step=start)
    progress = Progress(total, start, config.stage, config.train.progress)
    speed = Throughput()
    last = {}
    try:
        with sharding.use(mesh):
            for step in range(start + 1, total + 1):
                state, metrics = step_fn(state, sharding.host_to_global(next(train_iter), mesh), rng)
                speed.add(tokens_per_step)
                progress.update(1)
                is_last = step == total
                if step % config.train.log_every == 0 or is_last:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    check_finite(step, last)
                    last.update(lr=float(schedule(step - 1)), tokens_per_sec=speed.rate())
                    if is_last or (config.train.eval_every and step % config.train.eval_every == 0):
                        last.update(evaluate_fn(state["params"]))
                    writer.write(step, last)
                    progress.update(0, loss=last["loss"])
                if step % config.train.checkpoint_every == 0 or is_last:
                    check_finite(step, jax.device_get(metrics))  # never save a NaN state
                    manager.save(step, state, train_iter.get_state(), force=is_last)
    finally:  # also on Ctrl-C / errors: finish in-flight async saves so the last good one is complete
        progress.close()
        manager.close()
        writer.close()
    return state, last
