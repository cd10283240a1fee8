"""Reward model: K-choose-2 Bradley–Terry over ranked completions, bias-normalised to the demonstrations.

Reads top to bottom: mesh -> data -> init -> step -> loop -> bias -> save.
One batch element is one prompt with all its K completions: each completion runs through the
model once ([B*K, T] rows) and all C(K,2) pairs are formed from the K scalars by `losses.rm_loss`.

Importable scoring for notebooks, PPO and evaluation: `RewardModel.load(path, mesh)` and
`score(params, tokens, segment_ids, positions, last_index, model=..., bias=...)`.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, losses, sharding, train_lib
from instructgpt_jax.data import iterators, prepare
from instructgpt_jax.models import ModelConfig, Transformer


def rewards_at(values, last_index):
    """values [..., T] -> the value at each row's last token [...] (where the reward is read)."""
    return jnp.take_along_axis(values, last_index[..., None].astype(jnp.int32), axis=-1)[..., 0]


def score(params, tokens, segment_ids, positions, last_index, *, model, bias=0.0):
    """Reward of each sequence, read at `last_index` (its EOS), plus the normalising bias.

    tokens / segment_ids / positions: [..., T]; last_index: [...]. Returns float32 [...].
    """
    lead = tokens.shape[:-1]
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    values = model.apply({"params": params}, flat(tokens), flat(positions), flat(segment_ids))
    return rewards_at(values.reshape(*lead, -1), last_index) + bias


def rm_loss_fn(params, batch, rng, *, model, deterministic):
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    values = model.apply({"params": params}, flat(batch["tokens"]), flat(batch["positions"]),
                         flat(batch["segment_ids"]), deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
    rewards = rewards_at(values.reshape(b, k, t), batch["last_index"])
    loss, aux = losses.rm_loss(rewards, batch["ranks"], batch["valid"])
    valid = batch["valid"].astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    mean = (rewards * valid).sum() / n
    return loss, {"accuracy": aux["accuracy"], "weight": aux["num_prompts"], "num_pairs": aux["num_pairs"],
                  "reward_mean": mean, "reward_std": jnp.sqrt(((rewards - mean) ** 2 * valid).sum() / n)}


def train_step(state, batch, rng, *, model, tx, grad_accum=1):
    """(state, batch, rng) -> (state, metrics). Pure; jitted by the caller."""
    rng = jax.random.fold_in(rng, state["step"])
    loss_fn = functools.partial(rm_loss_fn, model=model, deterministic=False)
    loss, aux, grads = train_lib.accumulate_gradients(loss_fn, state["params"], batch, rng, grad_accum)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    metrics = {"loss": loss, "accuracy": aux["accuracy"], "reward_mean": aux["reward_mean"],
               "reward_std": aux["reward_std"], "grad_norm": train_lib.global_norm(grads)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, *, model):
    """Sums over one batch: the caller adds them up for exact split-level means."""
    loss, aux = rm_loss_fn(params, batch, None, model=model, deterministic=True)
    return {"loss_sum": loss * aux["weight"], "prompts": aux["weight"],
            "correct": aux["accuracy"] * aux["num_pairs"], "pairs": aux["num_pairs"]}


def evaluate(eval_fn, params, batches, mesh, max_batches: int = 0) -> dict:
    totals = train_lib.sum_over_batches(eval_fn, params, batches, mesh, max_batches)
    if not totals:
        return {}
    return {"eval_loss": totals["loss_sum"] / max(totals["prompts"], 1.0),
            "eval_accuracy": totals["correct"] / max(totals["pairs"], 1.0)}


def init_params(rm_model, lm_model, mesh, rng, sft_export=None):
    """Scalar-head params, with every trunk weight taken from the SFT export when given
    (the LM head, if untied, is dropped; the scalar head starts at N(0, 1/sqrt(d+1)), bias 0)."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    params, shardings = sharding.init_sharded(lambda r: rm_model.init(r, dummy)["params"], rng, mesh)
    if sft_export:
        shapes, lm_shardings = sharding.param_shardings(lambda r: lm_model.init(r, dummy)["params"], mesh)
        sft = checkpoints.load_export(sft_export, checkpoints.abstract_like(shapes, lm_shardings))
        params = {k: sft[k] if k in sft else v for k, v in params.items()}
    return params, shardings


def demonstration_bias(params, model, data: prepare.StageData, config, mesh) -> tuple[float, int]:
    """Bias b such that the SFT demonstrations score a mean of 0: b = -mean r(x, y_demo)."""
    demos = data.extra_sources["demonstrations"]
    n = min(len(demos), config.rm.bias_examples)
    b = config.train.batch_size
    rm = RewardModel(model, params, 0.0, {})
    rewards = []
    for start in range(0, n, b):
        rows = [demos[i] for i in range(start, min(start + b, n))]
        rows += rows[:1] * (b - len(rows))  # fixed shape: one compiled program
        r = rm.score_texts(data.tokenizer, [x["prompt"] for x in rows], [x["response"] for x in rows],
                           seq_len=config.data.seq_len, max_prompt_len=config.data.max_prompt_len, mesh=mesh)
        rewards.extend(r[:min(b, n - start)].tolist())
    return -float(np.mean(rewards)), len(rewards)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train the reward model; export params with the fitted bias. Resumes from `workdir`."""
    # --- mesh
    mesh = sharding.make_mesh(config.mesh)
    sharding.batch_size_per_process(config.train.batch_size, mesh)

    manager = checkpoints.Manager(workdir, config)  # refuses an incompatible workdir before any work

    # --- data
    data = prepare.prepare_comparisons(config, workdir)
    train_iter = data.train_iterator()
    model_cfg = ModelConfig.from_config(config.model)
    sft_export = prepare.init_source(config)
    if sft_export:
        checkpoints.check_model_matches(checkpoints.read_export_meta(sft_export)["model"], config.model, sft_export)

    # --- init: resume -> SFT export -> scratch
    rm_model, lm_model = Transformer(model_cfg, head="scalar"), Transformer(model_cfg)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    resuming = manager.latest_step() is not None
    params, _ = init_params(rm_model, lm_model, mesh, rng, None if resuming else sft_export)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": sharding.init_optimizer(tx, params)}
    state, state_shardings = train_lib.place_and_resume(state, mesh, manager, train_iter)

    # --- step
    step_fn = train_lib.jit_train_step(
        functools.partial(train_step, model=rm_model, tx=tx, grad_accum=config.train.grad_accum), state_shardings, mesh)
    repl = sharding.replicated(mesh)
    eval_fn = jax.jit(functools.partial(eval_step, model=rm_model), out_shardings=repl)

    # --- loop
    state, last = train_lib.fit(
        config=config, workdir=workdir, mesh=mesh, manager=manager, state=state, step_fn=step_fn,
        train_iter=train_iter, rng=rng,
        tokens_per_step=config.train.batch_size * config.data.max_k * config.data.seq_len,
        evaluate_fn=lambda p: evaluate(eval_fn, p, data.eval_iterator(), mesh, config.train.eval_batches))

    # --- bias: demonstrations average 0 (the paper normalises the RM before RL)
    with sharding.use(mesh):
        bias, n_demos = demonstration_bias(state["params"], rm_model, data, config, mesh)
    last.update(bias=bias)
    writer = train_lib.MetricWriter(workdir, resume_step=config.train.num_steps)
    writer.write(config.train.num_steps, {"bias": bias})
    writer.close()

    # --- save
    checkpoints.export(workdir, state["params"], tokenizer_path=data.tokenizer_path, meta={
        "stage": "rm", "model": config.model.to_dict(), "step": int(state["step"]), "rm_bias": bias,
        "bias_demonstrations": n_demos, "data_stats": data.stats()})
    return last


@dataclasses.dataclass
class RewardModel:
    """A trained, exported reward model: `rm(tokens, segment_ids, positions, last_index)` -> rewards + bias."""
    model: Transformer
    params: dict
    bias: float
    meta: dict

    @classmethod
    def load(cls, path: str, mesh=None, model_overrides: dict | None = None) -> "RewardModel":
        meta = checkpoints.read_export_meta(path)
        if "rm_bias" not in meta:
            raise ValueError(f"{path} is a {meta.get('stage')!r} export, not a reward model (no rm_bias)")
        mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
        cfg = ModelConfig.from_config({**meta["model"], **(model_overrides or {})})
        model = Transformer(cfg, head="scalar")
        shapes, shardings = sharding.param_shardings(
            lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], mesh)
        params = checkpoints.load_export(path, checkpoints.abstract_like(shapes, shardings))
        return cls(model, params, float(meta["rm_bias"]), meta)

    def __call__(self, tokens, segment_ids, positions, last_index):
        return _jit_score(self.params, tokens, segment_ids, positions, last_index, model=self.model, bias=self.bias)

    def score_texts(self, tokenizer, prompts, completions, *, seq_len: int, max_prompt_len: int,
                    mesh=None) -> np.ndarray:
        """Rewards (bias included) of (prompt, completion) strings, formatted exactly as in RM training."""
        rows = [iterators.scoring_example(p, c, tokenizer, seq_len=seq_len, max_prompt_len=max_prompt_len)
                for p, c in zip(prompts, completions)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if mesh is not None and len(rows) % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0:
            batch = sharding.global_from_full(batch, mesh)
        out = self(batch["tokens"], batch["segment_ids"], batch["positions"], batch["last_index"])
        return np.asarray(sharding.to_host(out))


_jit_score = jax.jit(score, static_argnames="model")
