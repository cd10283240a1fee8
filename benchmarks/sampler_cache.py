"""Sampling speed: KV-cached decoding vs recomputing the whole sequence at every step.

    python benchmarks/sampler_cache.py [--preset tiny|mini|small] [--batch 16] [--prompt 32] [--responses 32,64,128]

Random params, left-padded random prompts, temperature-1 sampling with an EOS that is never
sampled, so every row generates the full response length. Both samplers are compiled first, then
timed alternately (so drift in machine load hits both alike). Prints a markdown table of median
tokens/s (batch * response length / wall time) with the min-max spread, and the cache / no-cache
ratio; the last line is `ratio: X` at the longest response length.
"""
import argparse

import common
import jax

from instructgpt_jax import config_lib, sampling
from instructgpt_jax.models import Transformer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=config_lib.CPU_PRESETS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--responses", default="32,64,128", help="comma-separated response lengths")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per sampler and length")
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed calls of the same sampler before each timed one (see common.time_alternately)")
    args = parser.parse_args()
    lengths = [int(n) for n in args.responses.split(",")]

    # The position table of random params can simply be longer than the preset's context.
    cfg = common.model_config(args.preset)
    cfg = common.model_config(args.preset, max_len=max(cfg.max_len, args.prompt + max(lengths)))
    model = Transformer(cfg)
    params = common.random_params(model)
    prompts, mask = common.prompts(args.batch, args.prompt, cfg.vocab_size)

    print(common.machine_line(torch_too=False))
    print(f"preset {args.preset} ({common.model_line(cfg)}) | batch {args.batch}, prompt {args.prompt}, "
          f"{args.reps} reps\n")
    table = common.Table(["response", "cache tok/s (min-max)", "no-cache tok/s (min-max)", "cache / no-cache"], "rrrr")
    for n in lengths:
        def run(use_cache, n=n):
            sampler = sampling.make_sampler(model, max_new_tokens=n, eos_id=-1, pad_id=0, use_cache=use_cache)
            return lambda rep: jax.block_until_ready(sampler(params, prompts, mask, jax.random.PRNGKey(rep + 1)))
        fns = {"cache": run(True), "no cache": run(False)}
        for f in fns.values():  # compile + warm up
            f(-1)
        rates = {k: [args.batch * n / t for t in v]
                 for k, v in common.time_alternately(fns, args.reps, args.settle).items()}
        ratio = common.median(rates["cache"]) / common.median(rates["no cache"])
        table.row([n, common.cell(rates["cache"]), common.cell(rates["no cache"]), f"{ratio:.2f}x"])
    print(f"\nratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
