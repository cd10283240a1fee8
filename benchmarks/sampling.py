"""Rollout sampling throughput: our jitted KV-cache sampler vs transformers `model.generate` (KV cache).

    python benchmarks/sampling.py [--shapes tiny,gpt2] [--batches 16,64] [--prompt 32] [--response 96] [--reps 3]

Same weights in both (ours random, written with `hf.save_pretrained`, loaded into GPT2LMHeadModel),
float32, the same left-padded random prompts (lengths P/2..P, `attention_mask` for transformers),
pure ancestral sampling: temperature 1, top_k 0, top_p 1. Every row generates exactly `--response`
tokens on both sides: ours with `eos_id=-1` (never sampled), transformers with no EOS token in the
generation config (so nothing stops early); both outputs are checked to be full length.
transformers: `generate(do_sample=True, use_cache=True)` with its default (dynamic) KV cache.
torch uses as many threads as XLA:CPU (one per available core).

Tokens/s = batch * response length / wall time of one sampling call (prefill included). Both are
warmed up first, then called alternately. Prints a markdown table (median, min-max) and
`ratio: X`, the smallest ours / generate ratio in the table.
"""
import argparse
import tempfile

import common
import jax

from instructgpt_jax import sampling
from instructgpt_jax.models import Transformer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    common.add_cores_flag(parser)
    args = parser.parse_args()
    common.pin_cores(args.cores)
    threads = common.set_torch_threads()
    import torch
    p, n = args.prompt, args.response

    print(common.machine_line())
    print(f"sampling: prompt {p} (left-padded, P/2..P real tokens), response {n} (forced full length), "
          f"temperature 1, top_k 0, float32, {threads} threads each, {args.reps} reps (alternating)\n")
    table = common.Table(["shape", "batch", "ours tok/s", "generate tok/s", "ours / generate",
                          "seconds per call (ours / generate)"])
    ratios = []
    for shape in args.shapes.split(","):
        cfg = common.model_config(shape)
        if cfg.max_len < p + n:
            raise SystemExit(f"{shape}: max_len {cfg.max_len} < prompt + response {p + n}")
        model = Transformer(cfg)
        params = common.random_params(model)
        with tempfile.TemporaryDirectory() as tmp:
            tmodel = common.to_transformers(model, params, tmp).eval()
        tmodel.generation_config.eos_token_id = None  # nothing to stop at: full-length responses
        tmodel.generation_config.bos_token_id = None
        tmodel.generation_config.pad_token_id = 0
        sampler = sampling.make_sampler(model, max_new_tokens=n, eos_id=-1, pad_id=0, temperature=1.0, top_k=0)
        for b in (int(x) for x in args.batches.split(",")):
            tokens, mask = common.prompts(b, p, cfg.vocab_size)
            t_tokens, t_mask = torch.from_numpy(tokens).long(), torch.from_numpy(mask).long()

            def ours(rep, sampler=sampler, params=params, tokens=tokens, mask=mask, b=b):
                out = sampler(params, tokens, mask, jax.random.PRNGKey(rep + 1))
                assert float(out["response_mask"].sum()) == b * n  # blocks; every row ran to full length
                return out

            def theirs(rep, tmodel=tmodel, t_tokens=t_tokens, t_mask=t_mask, b=b):
                torch.manual_seed(rep + 1)
                with torch.no_grad():
                    out = tmodel.generate(input_ids=t_tokens, attention_mask=t_mask, do_sample=True, top_k=0,
                                          top_p=1.0, temperature=1.0, max_new_tokens=n, use_cache=True)
                assert out.shape == (b, p + n), out.shape
                return out

            fns = {"ours": ours, "generate": theirs}
            for f in fns.values():  # compile / warm up
                f(-2)
                f(-1)
            times = common.time_alternately(fns, args.reps, args.settle)
            rate = {k: [b * n / t for t in v] for k, v in times.items()}
            ratio = common.median(rate["ours"]) / common.median(rate["generate"])
            ratios.append(ratio)
            table.row([f"{shape} ({cfg.num_layers}L d{cfg.d_model} V{cfg.vocab_size})", str(b),
                       common.cell(rate["ours"]), common.cell(rate["generate"]), f"{ratio:.2f}x",
                       f"{common.median(times['ours']):.2f} / {common.median(times['generate']):.2f}"])
    print(f"\nratio: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
