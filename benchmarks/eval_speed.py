"""lm-eval requests per second: our backend (`instructgpt_jax.eval.JaxLM`) vs the harness's own `hf` backend.

    python benchmarks/eval_speed.py [--shapes tiny,gpt2] [--requests 64] [--context 96] [--gen 16] [--reps 3]

Same weights (ours random, written with `hf.save_pretrained`, read by `lm_eval`'s HFLM on the CPU), the same
byte-level BPE tokenizer (trained here), float32, the same batch size (16). Two workloads, the harness's two
main request kinds: `loglikelihood` (multiple-choice: `--requests` contexts of ~`--context` tokens, each with a
short continuation) and `generate_until` (`--gen` greedy requests of 32 new tokens, stop strings that never
occur). Each backend is warmed up on the whole workload first (our compilation excluded), then the two run
alternately (common.time_alternately). Prints a markdown table of median requests/s (min-max) and the
ours / hf ratio per row; the last line is `ratio: X` (loglikelihood on the last shape).
"""
import argparse
import os
import tempfile
import types

import common
import numpy as np

from instructgpt_jax.models import Transformer

WORDS = ("the cat sat on a mat while twelve dogs ran past quickly and a bird sang over the quiet river near "
         "an old stone bridge in the morning light").split()


def make_tokenizer(directory: str, vocab: int):
    """A GPT-2-style byte-level BPE (EOS <|endoftext|>) trained on random sentences of WORDS."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rs = np.random.RandomState(0)
    corpus = [" ".join(rs.choice(WORDS, 20)) for _ in range(2000)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=min(vocab, 600), show_progress=False,
                                                       special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "tokenizer_class": "GPT2Tokenizer"}, f)


def workloads(n_ll: int, context: int, n_gen: int):
    rs = np.random.RandomState(1)
    words = lambda k: " ".join(rs.choice(WORDS, k))  # noqa: E731  (~1 token per word)
    ll = [types.SimpleNamespace(args=(words(int(context * rs.uniform(0.5, 1.0))), " " + words(rs.randint(1, 6))))
          for _ in range(n_ll)]
    gen = [types.SimpleNamespace(args=(words(int(context * rs.uniform(0.5, 1.0))),
                                       dict(until=["NEVER"], max_gen_toks=32, do_sample=False)))
           for _ in range(n_gen)]
    return ll, gen


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help="comma-separated presets ('gpt2' = GPT-2 124M)")
    parser.add_argument("--requests", type=int, default=64, help="loglikelihood requests")
    parser.add_argument("--context", type=int, default=96, help="longest context, in words (~tokens)")
    parser.add_argument("--gen", type=int, default=16, help="generate_until requests (32 new tokens each)")
    parser.add_argument("--reps", type=int, default=3)
    common.add_cores_flag(parser)
    args = parser.parse_args()
    common.pin_cores(args.cores)
    common.set_torch_threads()
    import transformers
    from lm_eval.models.huggingface import HFLM

    from instructgpt_jax import eval as ev
    from instructgpt_jax import hf
    transformers.logging.set_verbosity_error()
    ll, gen = workloads(args.requests, args.context, args.gen)
    print(common.machine_line())
    print(f"{args.requests} loglikelihood requests (context <= ~{args.context} tokens), {args.gen} generate_until "
          f"requests (32 greedy tokens); batch 16, float32\n")
    print("| shape | request | ours (req/s) | hf backend (req/s) | ours / hf |")
    print("|---|---|---|---|---|")
    ratio = None
    for shape in args.shapes.split(","):
        cfg = common.model_config(shape, max_len=256)
        model = Transformer(cfg)
        params = common.random_params(model)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(model, params, d)
            make_tokenizer(d, cfg.vocab_size)
            ours = ev.JaxLM(hf_path=d, batch_size=16, max_length=256)
            theirs = HFLM(pretrained=d, device="cpu", batch_size=16, dtype="float32", max_length=256)
            for kind, reqs in (("loglikelihood", ll), ("generate_until", gen)):
                fns = {name: (lambda rep, lm=lm, kind=kind, reqs=reqs: getattr(lm, kind)(reqs, disable_tqdm=True))
                       for name, lm in (("ours", ours), ("hf", theirs))}
                for f in fns.values():
                    f(-1)  # warm-up: compilation, caches
                times = common.time_alternately(fns, args.reps, args.settle)
                rate = {k: [len(reqs) / t for t in v] for k, v in times.items()}
                r = common.median(rate["ours"]) / common.median(rate["hf"])
                print(f"| {shape} ({common.model_line(cfg)}) | {kind} | {common.cell(rate['ours'], '{:,.1f}')} | "
                      f"{common.cell(rate['hf'], '{:,.1f}')} | {r:.2f} |")
                if kind == "loglikelihood":
                    ratio = r
    print(f"\nratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
