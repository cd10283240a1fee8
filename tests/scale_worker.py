"""Every stage's jitted step on several meshes of 8 simulated CPU devices; prints one JSON line.

`tests/test_scale.py` runs this once in a subprocess (XLA_FLAGS must be set before jax starts, and
one process pays for one jax start-up) and asserts on the JSON. By hand:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python tests/scale_worker.py CKPT_DIR
Progress with timings goes to stderr.
"""
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, config_lib, lora, ppo, rm, sampling, scoring, sft, sharding, train_lib
from instructgpt_jax.models import ModelConfig, Transformer

# (data, fsdp, tensor); "ref" is the one-device run every other mesh is compared with.
MESHES = {"ref": (1, 1, 1), "8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "1,4,2": (1, 4, 2), "2,2,2": (2, 2, 2)}
STAGE_INIT = ("ref", "1,4,2")  # meshes that init through the stages' own sharded init (others: device_put)
CFG = ModelConfig(max_len=32)  # tiny: d_model 64, 4 heads, mlp 256, vocab 512: every sharded dim divides 8
B, T, K, STEPS = 8, 16, 3, 3
TX = train_lib.make_optimizer(config_lib.optim_config(1e-3), num_steps=10)
# params whose per-device shards are reported, with their Adam mu / nu
REPORTED = {"embed": ("embed", "embedding"), "wi": ("layers", "mlp", "wi", "kernel"),
            "query": ("layers", "attn", "query", "kernel"), "head": ("scalar_head", "kernel")}
T0 = time.perf_counter()


def log(what):
    print(f"[{time.perf_counter() - T0:6.1f}s] {what}", file=sys.stderr, flush=True)


def mesh_for(name):
    d, f, t = MESHES[name]
    return sharding.make_mesh({"data": d, "fsdp": f, "tensor": t}, jax.devices()[:d * f * t])


def int32(batch):  # numpy's randint gives int64; the models take int32
    return {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in batch.items()}


def sft_batch(seed):
    r = np.random.RandomState(seed)
    return int32({"tokens": r.randint(0, 512, (B, T)), "targets": r.randint(0, 512, (B, T)),
                  "positions": np.tile(np.arange(T), (B, 1)), "segment_ids": np.ones((B, T), np.int32),
                  "loss_mask": (r.rand(B, T) < 0.7).astype(np.float32)})


def rm_batch(seed):
    r = np.random.RandomState(seed)
    return int32({"tokens": r.randint(0, 512, (B, K, T)), "positions": np.tile(np.arange(T), (B, K, 1)),
                  "segment_ids": np.ones((B, K, T), np.int32), "last_index": r.randint(4, T, (B, K)),
                  "ranks": np.stack([r.permutation(K) for _ in range(B)]), "valid": np.ones((B, K), bool)})


def init_fn(model):
    return lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]


def state_from(host_params, model, mesh):
    """Train state on `mesh` from host params: params by their logical axes, Adam state like them."""
    _, shardings = sharding.param_shardings(init_fn(model), mesh)
    params = jax.device_put(host_params, shardings)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": sharding.init_optimizer(TX, params)}


def shard_shapes(state):
    """{'embed.params': {'global': [...], 'shard': [...]}, 'embed.mu': ...}: one shape on every device."""
    flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    out = {}
    for path, x in flat.items():
        kind = "params" if path[0] == "params" else next((p for p in path if p in ("mu", "nu")), None)
        for name, suffix in REPORTED.items():
            if kind and path[-len(suffix):] == suffix:
                shapes = {s.data.shape for s in x.addressable_shards}
                assert len(shapes) == 1, (name, kind, shapes)
                out[f"{name}.{kind}"] = {"global": list(x.shape), "shard": list(shapes.pop())}
    return out


def run_steps(step, state, batches, mesh):
    """Jit `step` with the state's shardings (donated), run it over `batches`; returns (state, losses)."""
    state, shardings = sharding.place(state, mesh)
    repl = sharding.replicated(mesh)
    step = jax.jit(step, in_shardings=(shardings, None, repl), out_shardings=(shardings, repl), donate_argnums=0)
    losses = []
    with sharding.use(mesh):
        for batch in batches:
            state, metrics = step(state, sharding.global_from_full(batch, mesh), jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
    return state, losses


def sample(mesh, params):
    """Greedy samples with their step logits, params and left-padded prompts sharded on `mesh`."""
    mask = np.ones((B, 8), np.int32)
    mask[::2, :3] = 0
    prompts = np.where(mask == 1, np.random.RandomState(0).randint(2, 512, mask.shape), 0).astype(np.int32)
    _, shardings = sharding.param_shardings(init_fn(Transformer(CFG)), mesh)
    sampler = sampling.make_sampler(Transformer(CFG), max_new_tokens=8, eos_id=1, pad_id=0, greedy=True,
                                    return_logits=True)
    with sharding.use(mesh):
        batch = sharding.global_from_full({"p": prompts, "m": mask}, mesh)
        out = jax.device_get(sampler(jax.device_put(params, shardings), batch["p"], batch["m"], jax.random.PRNGKey(0)))
    return {"tokens": out["tokens"].tolist(), "logits": out["logits"].tolist()}


def _ppo_config():
    config = config_lib.load("ppo", "tiny")
    config.ppo.ptx_coef = 0.5
    return config


def ppo_sample(seed, p=8, n=8):
    """A fixed 'sampled' batch: left-padded prompts, responses of random lengths (what the sampler returns)."""
    r = np.random.RandomState(seed)
    prompt_mask = np.ones((B, p), np.int32)
    prompt_mask[::2, :3] = 0
    lengths = r.randint(1, n + 1, B).astype(np.int32)
    response_mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    tokens = r.randint(4, 512, (B, p + n)).astype(np.int32)
    tokens[:, :p] *= prompt_mask
    tokens[:, p:] = (tokens[:, p:] * response_mask).astype(np.int32)
    return {"tokens": tokens, "prompt_mask": prompt_mask, "response_mask": response_mask, "lengths": lengths,
            "ended": lengths < n}


def run_ppo(mesh, host, lm, rm_model):
    """PPO-ptx: the rollout's forward pass and advantages, then STEPS update steps (policy, value, ptx, EMA)."""
    config = _ppo_config()
    _, lm_shardings = sharding.param_shardings(init_fn(lm), mesh)
    _, rm_shardings = sharding.param_shardings(init_fn(rm_model), mesh)
    sft_params, rm_params = jax.device_put(host["sft"], lm_shardings), jax.device_put(host["rm"], rm_shardings)
    state, shardings = sharding.place(ppo.init_state(sft_params, TX, 0.02, rm_params, TX), mesh)
    repl = sharding.replicated(mesh)
    forward = jax.jit(functools.partial(ppo.rollout_forward, policy=lm, value_model=rm_model, rm_model=rm_model,
                                        eos_id=1, temperature=1.0, rm_bias=0.1))
    advantages = jax.jit(functools.partial(ppo.advantages, cfg=config.ppo))
    update = jax.jit(functools.partial(ppo.update_step, policy=lm, value_model=rm_model, policy_tx=TX, value_tx=TX,
                                       cfg=config.ppo, prompt_len=8),
                     in_shardings=(shardings, None, None, None), out_shardings=(shardings, repl), donate_argnums=0)
    shards = shard_shapes(state["policy"])
    losses = []
    with sharding.use(mesh):
        sample = sharding.global_from_full(ppo_sample(0), mesh)
        out = forward({"policy": state["policy"]["params"], "reference": sft_params, "value": state["value"]["params"],
                       "rm": rm_params}, sample)
        adv, returns, _ = advantages(out["scores"], out["old_logp"], out["ref_logp"], out["values"],
                                     sample["response_mask"], sample["ended"], state["kl_beta"])
        rows = scoring.sequence_inputs(sample["tokens"], sample["prompt_mask"], sample["response_mask"])
        batch = dict(zip(("tokens", "positions", "segments"), rows), mask=sample["response_mask"],
                     old_logp=out["old_logp"], ref_logp=out["ref_logp"], advantages=adv,
                     old_values=out["values"], returns=returns)
        ptx = sharding.global_from_full(sft_batch(5), mesh)
        for i in range(STEPS):
            idx = jnp.asarray(np.random.RandomState(i).permutation(B))
            state, met = update(state, batch, idx, ptx)
            losses.append(float(met["pg_loss"]) + float(met["value_loss"]) + float(met["ptx_loss"]))
    return {"losses": losses, "shards": shards}


LORA_CFG = config_lib.replace(config_lib.load("sft", "tiny"), **{"lora.rank": 4, "lora.base_dtype": "nf4"})
LORA_MODEL = Transformer(ModelConfig.from_config(dict(vars(CFG)), LORA_CFG.lora))


def run_lora(mesh, host, stage_init):
    """SFT steps of rank-4 adapters on an NF4 base: the base stored on the mesh (lora.store_base), the adapters
    sharded like the weights they adapt (stage init, or device_put of the reference's onto those shardings)."""
    _, shardings = sharding.param_shardings(init_fn(lora.plain(LORA_MODEL)), mesh)
    base = jax.device_put(host["sft"], shardings)
    if stage_init:
        adapters = lora.init_adapters(LORA_MODEL, jax.random.PRNGKey(3), mesh)
        host.setdefault("adapters", jax.device_get(adapters))
    else:
        _, a_shardings = sharding.param_shardings(lambda r: lora.adapters(init_fn(LORA_MODEL)(r)), mesh)
        adapters = jax.device_put(host["adapters"], a_shardings)
    adapters, base = lora.setup(LORA_CFG, LORA_MODEL, base, None, mesh, adapter_params=adapters)
    step = functools.partial(train_lib.train_step, tx=TX, loss_fn=lora.with_base(
        functools.partial(sft.loss_fn, model=LORA_MODEL)))
    state = train_lib.new_state(adapters, TX)
    shards = {f"{m}.{leaf}": [s.data.shape for s in state["params"]["layers"]["attn"][m][leaf].addressable_shards][0]
              for m in ("query", "out") for leaf in ("lora_a", "lora_b")}
    shards["qkernel"] = [s.data.shape for s in base["layers"]["attn"]["query"]["qkernel"].addressable_shards][0]
    _, losses = run_steps(lambda st, b, r: step(st, b, r, (base, None)), state, [sft_batch(i) for i in range(STEPS)],
                          mesh)
    return {"losses": losses, "shards": {k: list(v) for k, v in shards.items()}}


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def error_of(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def main(ckpt_dir):
    results = {"devices": jax.device_count(), "sft": {}, "rm": {}, "ppo": {}, "sampler": {}, "params_diff": {},
               "init_diff": {}, "sft_lora": {}}
    lm, rm_model = Transformer(CFG), Transformer(CFG, head="scalar")
    sft_step = functools.partial(train_lib.train_step, loss_fn=functools.partial(sft.loss_fn, model=lm), tx=TX)
    rm_step = functools.partial(train_lib.train_step, loss_fn=functools.partial(rm.loss_fn, model=rm_model), tx=TX)
    host = {}  # the reference (one-device) init params of the LM and the RM, on the host
    finals = {}  # mesh -> final SFT state
    for name in MESHES:
        mesh = mesh_for(name)
        if name in STAGE_INIT:  # the stages' own sharded init
            state = train_lib.new_state(sharding.init_model(lm, jax.random.PRNGKey(0), mesh), TX)
            rm_params = checkpoints.init_with_trunk(rm_model, lm, mesh, jax.random.PRNGKey(0))
            rm_state = train_lib.new_state(rm_params, TX)  # as rm.train builds it
            host.setdefault("sft", jax.device_get(state["params"]))
            host.setdefault("rm", jax.device_get(rm_params))
            results["init_diff"][name] = max_diff(jax.device_get(state["params"]), host["sft"])
        else:  # same values, placed by device_put (saves compiling init on every mesh)
            state, rm_state = state_from(host["sft"], lm, mesh), state_from(host["rm"], rm_model, mesh)
        results["sampler"][name] = sample(mesh, host["sft"])
        log(f"{name}: init + sampler")
        shards = shard_shapes(state)
        finals[name], losses = run_steps(sft_step, state, [sft_batch(i) for i in range(STEPS)], mesh)
        results["sft"][name] = {"losses": losses, "shards": shards}
        results["params_diff"][name] = max_diff(jax.device_get(finals[name]["params"]),
                                                jax.device_get(finals["ref"]["params"]))
        shards = shard_shapes(rm_state)
        _, losses = run_steps(rm_step, rm_state, [rm_batch(i) for i in range(STEPS)], mesh)
        results["rm"][name] = {"losses": losses, "shards": shards}
        results["ppo"][name] = run_ppo(mesh, host, lm, rm_model)
        results["sft_lora"][name] = run_lora(mesh, host, name in STAGE_INIT)
        log(f"{name}: sft + rm + ppo + sft with QLoRA")

    # A checkpoint saved on (8,1,1), restored by the stages' Manager onto (1,4,2)'s shardings.
    config = ml_collections.ConfigDict({"train": {"keep_checkpoints": 1}})
    saved = finals["8,1,1"]
    mgr = checkpoints.Manager(ckpt_dir, config)
    mgr.save(STEPS, saved, {"pos": 7}, force=True)
    mgr.close()
    target = jax.tree.map(lambda x: x.sharding, finals["1,4,2"])
    restored, data_state = checkpoints.Manager(ckpt_dir, config).restore(checkpoints.abstract_like(saved, target))
    results["restore"] = {
        "equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(saved)),
                                                           jax.tree.leaves(jax.device_get(restored)))),
        "same_shardings": all(r.sharding == t for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
        "shards": shard_shapes(restored), "data_state": data_state}
    log("restore")

    # Gradient accumulation: 2 microbatches of 4 rows == the 8-row batch, on (2,2,2).
    mesh = mesh_for("2,2,2")
    accum, losses = run_steps(functools.partial(sft_step, grad_accum=2),
                              state_from(host["sft"], lm, mesh), [sft_batch(i) for i in range(STEPS)], mesh)
    results["grad_accum"] = {"losses": losses, "params_diff": max_diff(jax.device_get(accum["params"]),
                                                                       jax.device_get(finals["2,2,2"]["params"]))}
    log("grad_accum")

    # bfloat16 compute with float32 master params and optimizer state, on (1,4,2).
    mesh = mesh_for("1,4,2")
    bf16 = Transformer(ModelConfig(max_len=32, dtype="bfloat16"))
    state, losses = run_steps(functools.partial(train_lib.train_step, tx=TX,
                                                loss_fn=functools.partial(sft.loss_fn, model=bf16)),
                              state_from(host["sft"], bf16, mesh), [sft_batch(i) for i in range(2)], mesh)
    results["bf16"] = {"losses": losses, "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(
        (state["params"], state["opt_state"])) if jnp.issubdtype(x.dtype, jnp.floating)})}
    log("bf16")

    results["errors"] = {  # bad meshes
        "product": error_of(lambda: sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})),
        "fill": error_of(lambda: sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 3})),
        "divide": error_of(lambda: sharding.init_model(lm, jax.random.PRNGKey(0), sharding.make_mesh(
            {"data": 1, "fsdp": 1, "tensor": 8}))),
    }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
