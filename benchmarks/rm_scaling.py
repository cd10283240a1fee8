"""Reward-model train step vs K (completions per prompt) at a fixed prompt count.

    python benchmarks/rm_scaling.py [--preset mini] [--prompts 8] [--seq 64] [--ks 2,3,4,5,6,7,8,9] [--reps 5]

The generic `train_lib.train_step` on `rm.loss_fn` exactly as `rm.train` runs it (jitted on the stage's
mesh, donated state, AdamW with clipping; params from `checkpoints.init_with_trunk`): one batch element is one prompt with all its K completions, each completion goes through
the model once ([prompts * K, seq] rows) and all C(K, 2) pairs are formed from the K scalars. So the
step should grow linearly in K (the forward/backward work is prompts*K rows; the pair loss is
O(K^2) but on scalars), not quadratically as it would if every pair ran both completions
through the model: K = 9 / K = 2 should be close to 9/2 = 4.5 (goal <= 5; the pairwise
alternative would be C(9,2)/C(2,2) = 36).

Every K is compiled and warmed up first; then the K values run alternately, one step each in turn.
Prints a markdown table (median, min-max) and `ratio: X` = median step time at the largest K /
at the smallest K.
"""
import argparse
import functools

import common
import jax
import numpy as np

from instructgpt_jax import checkpoints, config_lib, rm, sharding, train_lib
from instructgpt_jax.models import Transformer


def comparison_batch(prompts, k, seq, vocab, seed=0):
    """Random completions of random lengths (seq/2..seq), ranked by a random permutation per prompt."""
    rs = np.random.RandomState(seed + k)
    lengths = rs.randint(seq // 2, seq + 1, size=(prompts, k))
    segment_ids = (np.arange(seq)[None, None] < lengths[..., None]).astype(np.int32)
    return {"tokens": np.where(segment_ids == 1, rs.randint(1, vocab, (prompts, k, seq)), 0).astype(np.int32),
            "segment_ids": segment_ids,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (prompts, k, seq)).copy(),
            "last_index": (lengths - 1).astype(np.int32),
            "ranks": np.stack([rs.permutation(k) for _ in range(prompts)]).astype(np.int32),
            "valid": np.ones((prompts, k), np.int32)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch (fixed over K)")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--ks", default="2,3,4,5,6,7,8,9")
    parser.add_argument("--reps", type=int, default=5)
    common.add_cores_flag(parser)
    args = parser.parse_args()
    common.pin_cores(args.cores)
    ks = [int(k) for k in args.ks.split(",")]

    cfg = common.model_config(args.preset)
    mesh = sharding.make_mesh(config_lib.mesh_config())
    model = Transformer(cfg, head="scalar")
    tx = train_lib.make_optimizer(config_lib.optim_config(1e-4), num_steps=10_000)
    params = checkpoints.init_with_trunk(model, Transformer(cfg), mesh, jax.random.PRNGKey(0))
    run = common.train_step_runner(functools.partial(rm.loss_fn, model=model), params, tx, mesh)
    batches = {k: sharding.host_to_global(comparison_batch(args.prompts, k, args.seq, cfg.vocab_size), mesh)
               for k in ks}
    fns = {k: (lambda _rep, k=k: run(batches[k])) for k in ks}  # one state, stepped by every K in turn
    for f in fns.values():  # compile every K, then one more warm step
        f(-1)
        f(-1)
    times = common.time_alternately(fns, args.reps)

    print(common.machine_line(torch_too=False))
    print(f"RM train step ({args.preset}: {common.model_line(cfg)}), {args.prompts} prompts x K completions "
          f"x {args.seq} tokens, {args.reps} reps (alternating over K)\n")
    base = common.median(times[ks[0]])
    table = common.Table(["K", "rows (prompts*K)", "pairs per prompt", "step ms", "ms per completion",
                          f"time / time(K={ks[0]})", "linear"])
    for k in ks:
        t = times[k]
        table.row([k, args.prompts * k, k * (k - 1) // 2, common.cell([x * 1e3 for x in t], "{:,.1f}"),
                   f"{common.median(t) * 1e3 / (args.prompts * k):.2f}", f"{common.median(t) / base:.2f}",
                   f"{k / ks[0]:.2f}"])
    ratio = common.median(times[ks[-1]]) / base
    print(f"\nK={ks[-1]} / K={ks[0]}: {ratio:.2f} (linear: {ks[-1] / ks[0]:.2f}, goal <= 5)")
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
