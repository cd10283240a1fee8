"""Reward model: K-choose-2 Bradley–Terry over ranked completions, bias-normalised to the demonstrations.

Reads top to bottom: mesh -> data -> init -> step -> loop -> bias -> save.
One batch element is one prompt with all its K completions: each completion runs through the
model once ([B*K, T] rows) and all C(K,2) pairs are formed from the K scalars by `losses.rm_loss`.
Scoring a trained RM (PPO, evaluation, notebooks) is `scoring.RewardModel`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, harness, lora, losses, scoring, sharding, train_lib
from instructgpt_jax.data import prepare
from instructgpt_jax.models import Transformer


def loss_fn(params, batch, rng, frozen=None, *, model):
    """`losses.rm_loss` on the K rewards of each prompt; metrics: pair accuracy, reward mean / std."""
    del frozen
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)  # noqa: E731
    values = model.apply({"params": params}, flat(batch["tokens"]), flat(batch["positions"]),
                         flat(batch["segment_ids"]), deterministic=rng is None,
                         rngs=None if rng is None else {"dropout": rng})
    rewards = scoring.rewards_at(values.reshape(b, k, t).astype(jnp.float32), batch["last_index"])
    loss, aux = losses.rm_loss(rewards, batch["ranks"], batch["valid"])
    valid = batch["valid"].astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    mean = (rewards * valid).sum() / n
    return loss, {"accuracy": aux["accuracy"], "accuracy_weight": aux["num_pairs"], "weight": aux["num_prompts"],
                  "reward_mean": mean, "reward_std": jnp.sqrt(((rewards - mean) ** 2 * valid).sum() / n)}


def _last_reply(row: dict) -> dict:
    """A demonstration as (prompt conversation, reply): a chat row's last assistant turn is the reply."""
    messages = row.get("messages") or []
    if not messages:
        return {"prompt": row["prompt"], "response": row["response"], "messages": []}
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"prompt": "", "response": messages[last]["content"], "messages": messages[:last]}


def demonstration_bias(rm: scoring.RewardModel, data: prepare.StageData, config, mesh) -> tuple[float, int]:
    """Bias b such that the SFT demonstrations score a mean of 0: b = -mean r(x, y_demo)."""
    demos = data.extra_sources["demonstrations"]
    n = min(len(demos), config.rm.bias_examples)
    b = config.train.batch_size
    rewards = []
    for start in range(0, n, b):
        rows = [_last_reply(demos[i]) for i in range(start, min(start + b, n))]
        rows += rows[:1] * (b - len(rows))  # fixed shape: one compiled program
        r = rm.score_texts(data.tokenizer, [x["prompt"] for x in rows], [x["response"] for x in rows],
                           messages=[x["messages"] for x in rows], chat_template=data.chat_template,
                           seq_len=config.data.seq_len, max_prompt_len=config.data.max_prompt_len, mesh=mesh)
        rewards.extend(r[:min(b, n - start)].tolist())
    return -float(np.mean(rewards)), len(rewards)


def train(config: ml_collections.ConfigDict, workdir: str, *, builtin_data=None) -> dict:
    """Train the reward model; export params with the fitted bias. Resumes from `workdir`."""
    # --- mesh (and the config resolved: the SFT export's model, data paths checked)
    run = harness.Stage(config, workdir)
    config, mesh = run.config, run.mesh

    # --- data
    data = prepare.prepare_comparisons(config, workdir, builtin_data)

    # --- init: resume -> SFT export -> scratch
    model_cfg = lora.model_config(config)
    model = Transformer(model_cfg, head="scalar")
    manager = run.start(data, model)
    tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
    rng = jax.random.PRNGKey(config.seed)
    # The scalar head starts at N(0, 1/sqrt(d+1)), bias 0; the trunk from SFT (LoRA: a frozen base, loaded
    # even when resuming; the adapters and the head train).
    trunk = None if (run.resuming and not lora.enabled(config)) or not run.source else run.source.path
    params = checkpoints.init_with_trunk(lora.plain(model), lora.plain(Transformer(model_cfg)), mesh, rng, trunk)
    params, base = lora.setup(config, model, params, rng, mesh, heads=("scalar_head",),
                              adapter_params=run.adapter(model))

    # --- step + loop: the generic train step on this stage's loss, the shared loop
    state, last = train_lib.run_supervised(
        config=config, workdir=workdir, mesh=mesh, manager=manager, params=params, tx=tx, data=data, rng=rng,
        loss_fn=lora.with_base(functools.partial(loss_fn, model=model)), frozen=(base, None),
        units_per_step=config.train.batch_size * config.data.max_k * config.data.seq_len)

    # --- bias: demonstrations average 0 (the paper normalises the RM before RL)
    with sharding.use(mesh):
        rm = scoring.RewardModel(model, lora.combine(state["params"], base), 0.0, {})
        bias, n_demos = demonstration_bias(rm, data, config, mesh)
    last.update(bias=bias)
    writer = train_lib.MetricWriter(workdir, resume_step=config.train.num_steps)
    writer.write(config.train.num_steps, {"bias": bias})
    writer.close()

    # --- save
    run.export(state["params"], data, step=int(state["step"]), rm_bias=bias, bias_demonstrations=n_demos, base=base)
    return last
