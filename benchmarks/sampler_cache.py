"""Sampling speed: KV-cached decoding vs recomputing the whole sequence at every step.

    python benchmarks/sampler_cache.py [--preset tiny|mini|small] [--batch 16] [--prompt 32] [--responses 32,64,128]

Random params, left-padded random prompts, temperature-1 sampling with an EOS that is never
sampled, so every row generates the full response length. Both samplers are compiled first, then
timed alternately (so drift in machine load hits both alike). Prints a markdown table of median
tokens/s (batch * response length / wall time) with the min-max spread, and the cache / no-cache
ratio; the last line is `ratio: X` at the longest response length.
"""
import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instructgpt_jax import config_lib, sampling  # noqa: E402
from instructgpt_jax.models import ModelConfig, Transformer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=config_lib.CPU_PRESETS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--responses", default="32,64,128", help="comma-separated response lengths")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per sampler and length")
    args = parser.parse_args()
    lengths = [int(n) for n in args.responses.split(",")]

    cfg = ModelConfig.from_config(config_lib.model_config(args.preset))
    # The position table of random params can simply be longer than the preset's context.
    cfg = dataclasses.replace(cfg, max_len=max(cfg.max_len, args.prompt + max(lengths)))
    model = Transformer(cfg)
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 4), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    starts = rs.randint(0, args.prompt // 2 + 1, size=(args.batch, 1))  # prompt lengths P/2..P
    mask = (np.arange(args.prompt)[None] >= starts).astype(np.int32)
    prompts = np.where(mask == 1, rs.randint(2, cfg.vocab_size, size=mask.shape), 0).astype(np.int32)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} | preset {args.preset} "
          f"({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}) | batch {args.batch}, "
          f"prompt {args.prompt}, {args.reps} reps\n")
    print("| response | cache tok/s (min-max) | no-cache tok/s (min-max) | cache / no-cache |")
    print("|---:|---:|---:|---:|")
    for n in lengths:
        samplers = {use_cache: sampling.make_sampler(model, max_new_tokens=n, eos_id=-1, pad_id=0,
                                                     use_cache=use_cache) for use_cache in (True, False)}
        for f in samplers.values():  # compile + warm up
            jax.block_until_ready(f(params, prompts, mask, jax.random.PRNGKey(0)))
        rates = {k: [] for k in samplers}
        for rep in range(args.reps):
            for use_cache, f in samplers.items():
                t0 = time.perf_counter()
                out = jax.block_until_ready(f(params, prompts, mask, jax.random.PRNGKey(rep + 1)))
                rates[use_cache].append(float(out["response_mask"].sum()) / (time.perf_counter() - t0))
        med = {k: statistics.median(v) for k, v in rates.items()}
        cell = lambda k: f"{med[k]:,.0f} ({min(rates[k]):,.0f}-{max(rates[k]):,.0f})"  # noqa: E731
        ratio = med[True] / med[False]
        print(f"| {n} | {cell(True)} | {cell(False)} | {ratio:.2f}x |")
    print(f"\nratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
