"""Runs every stage's jitted step on several meshes of 8 simulated CPU devices; prints one JSON object.

`tests/test_scale.py` runs this once in a subprocess (XLA_FLAGS must be set before jax starts, and
one process keeps the compile cost to one jax import) and asserts on the JSON. Usage:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scale_worker.py CKPT_DIR
"""
import functools
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from instructgpt_jax import checkpoints, config_lib, rm, sampling, sft, sharding, train_lib
from instructgpt_jax.models import ModelConfig, Transformer

# (data, fsdp, tensor); "ref" is the one-device reference every other mesh is compared with.
MESHES = {"ref": (1, 1, 1), "8,1,1": (8, 1, 1), "1,8,1": (1, 8, 1), "1,4,2": (1, 4, 2), "2,2,2": (2, 2, 2)}
CFG = ModelConfig(max_len=32)  # tiny: d_model 64, 4 heads, mlp 256, vocab 512: every dim divides 8
B, T, K, STEPS = 8, 16, 3, 3
TX = train_lib.make_optimizer(config_lib.optim_config(1e-3), num_steps=10)
REPORTED = {"embed": ("params", "embed", "embedding"), "wi": ("params", "layers", "mlp", "wi", "kernel"),
            "query": ("params", "layers", "attn", "query", "kernel")}  # params whose shards are reported


def log(what, t0=time.perf_counter()):
    print(f"[{time.perf_counter() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)


def mesh_for(name):
    d, f, t = MESHES[name]
    devices = jax.devices()[:1] if name == "ref" else jax.devices()
    return sharding.make_mesh({"data": d, "fsdp": f, "tensor": t}, devices)


def sft_batch(seed=0, b=B):
    r = np.random.RandomState(seed)
    return {"tokens": r.randint(0, 512, (b, T)).astype(np.int32), "targets": r.randint(0, 512, (b, T)).astype(np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (b, 1)), "segment_ids": np.ones((b, T), np.int32),
            "loss_mask": (r.rand(b, T) < 0.7).astype(np.float32)}


def rm_batch(seed=0):
    r = np.random.RandomState(seed)
    return {"tokens": r.randint(0, 512, (B, K, T)).astype(np.int32),
            "positions": np.tile(np.arange(T, dtype=np.int32), (B, K, 1)), "segment_ids": np.ones((B, K, T), np.int32),
            "last_index": r.randint(4, T, (B, K)).astype(np.int32),
            "ranks": np.stack([r.permutation(K) for _ in range(B)]).astype(np.int32), "valid": np.ones((B, K), bool)}


def shard_shapes(state):
    """Per-device shard shape of a few params and of their Adam mu / nu (all devices checked equal)."""
    out = {}
    flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for name, path in REPORTED.items():
        for kind in ("params", "mu", "nu"):
            key = path if kind == "params" else next(p for p in flat if kind in p and p[-len(path) + 1:] == path[1:])
            x = flat[key]
            shapes = {s.data.shape for s in x.addressable_shards}
            assert len(shapes) == 1, shapes
            out[f"{name}.{kind}"] = {"global": list(x.shape), "shard": list(shapes.pop())}
    return out


def run_steps(step, state, shardings, batches, mesh):
    repl = sharding.replicated(mesh)
    step = jax.jit(step, in_shardings=(shardings, None, repl), out_shardings=(shardings, repl), donate_argnums=0)
    losses = []
    with sharding.use(mesh):
        for batch in batches:
            state, metrics = step(state, sharding.global_from_full(batch, mesh), jax.random.PRNGKey(1))
            losses.append(float(metrics["loss"]))
    return state, losses


def run_sft(mesh, model_cfg=CFG, grad_accum=1, batches=None, steps=STEPS):
    model = Transformer(model_cfg)
    state = sft.init_state(model, TX, None, mesh, jax.random.PRNGKey(0))
    state, shardings = sharding.place(state, mesh)
    init_params = jax.device_get(state["params"])
    shapes = shard_shapes(state)
    step = functools.partial(sft.train_step, model=model, tx=TX, grad_accum=grad_accum)
    state, losses = run_steps(step, state, shardings, batches or [sft_batch(i) for i in range(steps)], mesh)
    return dict(losses=losses, shards=shapes), state, shardings, init_params


def run_rm(mesh):
    rm_model, lm_model = Transformer(CFG, head="scalar"), Transformer(CFG)
    params, _ = rm.init_params(rm_model, lm_model, mesh, jax.random.PRNGKey(0))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": sharding.init_optimizer(TX, params)}
    state, shardings = sharding.place(state, mesh)
    shapes = shard_shapes(state)
    step = functools.partial(rm.train_step, model=rm_model, tx=TX)
    state, losses = run_steps(step, state, shardings, [rm_batch(i) for i in range(STEPS)], mesh)
    head = state["params"]["scalar_head"]["kernel"]
    shapes["scalar_head.params"] = {"global": list(head.shape), "shard": list(head.addressable_shards[0].data.shape)}
    return dict(losses=losses, shards=shapes)


def run_sampler(mesh, params):
    """Greedy samples with step logits from the SFT init params (placed on this mesh)."""
    mask = np.ones((B, 8), np.int32)
    mask[::2, :3] = 0  # left padding on every other row
    prompts = np.where(mask == 1, np.random.RandomState(0).randint(2, 512, mask.shape), 0).astype(np.int32)
    _, shardings = sharding.param_shardings(lambda r: Transformer(CFG).init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                                            mesh)
    sampler = sampling.make_sampler(Transformer(CFG), max_new_tokens=8, eos_id=1, pad_id=0, greedy=True,
                                    return_logits=True)
    with sharding.use(mesh):
        batch = sharding.global_from_full({"p": prompts, "m": mask}, mesh)
        out = sampler(jax.device_put(params, shardings), batch["p"], batch["m"], jax.random.PRNGKey(0))
        out = jax.device_get(out)
    return {"tokens": out["tokens"].tolist(), "logits": out["logits"][:, :, :16].tolist(),
            "logits_sum": float(np.abs(out["logits"]).sum())}


# --- PPO: the lead adds `run_ppo(mesh) -> dict(losses=[...], shards={...})` here (same shape as
# run_sft's first result) and a `results["ppo"][name] = run_ppo(mesh)` line in main(); the
# parametrized tests in test_scale.py pick it up from the JSON.


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def error_of(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def main(ckpt_dir):
    results = {"devices": jax.device_count(), "sft": {}, "rm": {}, "sampler": {}, "params_diff": {},
               "init_diff": {}}
    finals = {}  # mesh -> (final state, its shardings, init params on the host)
    for name in MESHES:
        mesh = mesh_for(name)
        results["sft"][name], *finals[name] = run_sft(mesh)
        log(f"sft {name}")
        ref_state, _, ref_init = finals["ref"]
        results["init_diff"][name] = max_diff(finals[name][2], ref_init)  # sharded init == unsharded init
        results["params_diff"][name] = max_diff(jax.device_get(finals[name][0]["params"]),
                                                jax.device_get(ref_state["params"]))
        results["rm"][name] = run_rm(mesh)
        log(f"rm {name}")
        results["sampler"][name] = run_sampler(mesh, ref_init)
        log(f"sampler {name}")

    # Checkpoint saved on (8,1,1), restored onto (1,4,2) shardings through the stage's Manager.
    config = ml_collections.ConfigDict({"train": {"keep_checkpoints": 1}})
    saved, _, _ = finals["8,1,1"]
    mgr = checkpoints.Manager(ckpt_dir, config)
    mgr.save(STEPS, saved, {"pos": 0}, force=True)
    mgr.close()
    target = finals["1,4,2"][1]
    restored, data_state = checkpoints.Manager(ckpt_dir, config).restore(checkpoints.abstract_like(saved, target))
    results["restore"] = {
        "equal": all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(saved)),
                                                           jax.tree.leaves(jax.device_get(restored)))),
        "same_shardings": all(r.sharding == t for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))),
        "shards": shard_shapes(restored), "data_state": data_state}

    log("restore")
    # Gradient accumulation: 2 microbatches == the full batch (one step on a 16-row batch).
    mesh = mesh_for("2,2,2")
    big = [sft_batch(7, b=16)]
    full, full_state, _, _ = run_sft(mesh, batches=big)
    accum, accum_state, _, _ = run_sft(mesh, batches=big, grad_accum=2)
    results["grad_accum"] = {"loss_full": full["losses"][0], "loss_accum": accum["losses"][0],
                             "params_diff": max_diff(jax.device_get(full_state["params"]),
                                                     jax.device_get(accum_state["params"]))}

    log("grad_accum")
    # bfloat16 compute, float32 master params and optimizer state.
    bf16, state, _, _ = run_sft(mesh_for("1,4,2"), model_cfg=ModelConfig(max_len=32, dtype="bfloat16"), steps=2)
    results["bf16"] = {"losses": bf16["losses"], "f32_losses": results["sft"]["ref"]["losses"][:2],
                       "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves((state["params"], state["opt_state"]))
                                         if jnp.issubdtype(x.dtype, jnp.floating)})}

    log("bf16")
    # Bad meshes: clear errors.
    results["errors"] = {
        "product": error_of(lambda: sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1})),
        "fill": error_of(lambda: sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 3})),
        "divide": error_of(lambda: sft.init_state(Transformer(CFG), TX, None, sharding.make_mesh(
            {"data": 1, "fsdp": 1, "tensor": 8}), jax.random.PRNGKey(0))),
    }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
