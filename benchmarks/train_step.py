"""SFT train-step throughput: our jitted step vs GPT2LMHeadModel + torch.optim.AdamW (eager, and torch.compile).

    python benchmarks/train_step.py [--shapes tiny,gpt2] [--seq 128] [--batch tiny=32,gpt2=8] [--reps 5] [--cores N]
                                    [--no-compile] [--lora R] [--logits_chunk C]

--lora R: LoRA instead (rank R, alpha 2R, every linear layer of the blocks): ours (adapters only in the train
state, `lora.with_base`, as the stages run it) vs transformers + peft (`LoraConfig` on c_attn, c_proj, c_fc:
GPT-2's fused q|k|v gets one adapter there, three here) with AdamW over the adapters only; our full fine-tuning
step on the same batch is timed alongside for the LoRA / full ratio.

Both frameworks train the same architecture from the SAME weights (ours are initialised randomly and
written with `hf.save_pretrained`, then loaded by transformers): float32, dropout off, same batch of
random tokens, loss = mean cross-entropy over the masked (response) tokens, Adam(b1 0.9, b2 0.95,
eps 1e-8, no weight decay) with global-norm clipping at 1.0 on both sides. Ours is the generic
`train_lib.train_step` on `sft.loss_fn` exactly as `sft.train` runs it: `jax.jit` with explicit
shardings on the stage's mesh and donated state. torch runs with as many intra-op threads as XLA:CPU uses (one per available core).

Tokens/s = batch * sequence length / step wall time. Every contender is warmed up first (for
torch.compile that includes compilation), then they run alternately, one step each in turn.
Prints a markdown table (median and min-max over the repetitions) and `ratio: X`, the smallest
ours / eager ratio over the shapes.
"""
import argparse
import functools
import tempfile

import common
import jax
import numpy as np

from instructgpt_jax import config_lib, sft, sharding, train_lib
from instructgpt_jax.models import Transformer


def make_batch(batch, seq, vocab, seed=0):
    """Random rows; the first quarter of each row is 'prompt' (not trained on), the rest 'response'."""
    rs = np.random.RandomState(seed)
    rows = rs.randint(0, vocab, (batch, seq + 1)).astype(np.int32)
    loss_mask = (np.arange(seq)[None] >= seq // 4).astype(np.int32).repeat(batch, 0)
    return {"tokens": rows[:, :-1], "targets": rows[:, 1:], "loss_mask": loss_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "segment_ids": np.ones((batch, seq), np.int32)}


def ours(cfg, batch, optim_cfg):
    """(model, params before the first step (host copy), step(rep) -> loss that blocks)."""
    mesh = sharding.make_mesh(config_lib.mesh_config())
    model = Transformer(cfg)
    tx = train_lib.make_optimizer(optim_cfg, num_steps=10_000)
    params = sharding.init_model(model, jax.random.PRNGKey(0), mesh)
    params0 = jax.tree.map(np.asarray, params)  # host copy for transformers (the state is donated)
    run = common.train_step_runner(functools.partial(sft.loss_fn, model=model), params, tx, mesh)
    gbatch = sharding.host_to_global(batch, mesh)
    return model, params0, lambda _rep: run(gbatch)


def ours_lora(cfg, batch, optim_cfg, rank):
    """(params of the base (host copy), step(rep) -> loss) of a rank-`rank` LoRA SFT step on a random base."""
    import dataclasses

    from instructgpt_jax import lora
    mesh = sharding.make_mesh(config_lib.mesh_config())
    model = Transformer(dataclasses.replace(cfg, lora_rank=rank, lora_alpha=2.0 * rank))
    tx = train_lib.make_optimizer(optim_cfg, num_steps=10_000)
    base = sharding.init_model(lora.plain(model), jax.random.PRNGKey(0), mesh)
    params0 = jax.tree.map(np.asarray, base)
    adapters = lora.init_adapters(model, jax.random.PRNGKey(1), mesh)
    run = common.train_step_runner(lora.with_base(functools.partial(sft.loss_fn, model=model)), adapters, tx, mesh,
                                   frozen=(base, None))
    gbatch = sharding.host_to_global(batch, mesh)
    return params0, lambda _rep: run(gbatch)


def theirs_lora(model, params, batch, optim_cfg, tmpdir, rank):
    """step(rep) of transformers + peft LoRA (same base weights) with AdamW over the adapters only."""
    import peft
    import torch
    import torch.nn.functional as F
    tmodel = common.to_transformers(model, params, tmpdir).train()
    tmodel = peft.get_peft_model(tmodel, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                         target_modules=["c_attn", "c_proj", "c_fc"],
                                                         fan_in_fan_out=True, init_lora_weights="gaussian"))
    trainable = [p for p in tmodel.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps,
                            weight_decay=0.0)
    x = torch.from_numpy(batch["tokens"]).long()
    y = torch.from_numpy(np.where(batch["loss_mask"] == 1, batch["targets"], -100)).long()

    def step(_rep):
        opt.zero_grad(set_to_none=True)
        logits = tmodel(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, optim_cfg.grad_clip)
        opt.step()
        return float(loss.detach())
    return step


def main_lora(args, shapes, batches, optim_cfg):
    """--lora R: ours LoRA vs transformers + peft LoRA, and ours LoRA vs ours full fine-tuning."""
    print(f"LoRA SFT train step, rank {args.lora}, alpha {2 * args.lora}, every linear layer, seq {args.seq}, "
          f"float32, {args.reps} reps (alternating), tokens/s = batch*seq/step time\n")
    table = common.Table(["shape", "batch", "ours LoRA tok/s", "peft LoRA tok/s", "ours full tok/s",
                          "ours LoRA / peft", "ours LoRA / ours full (time)"])
    notes = []
    for shape in shapes:
        b = int(batches.get(shape, 8))
        cfg = common.model_config(shape, max_len=max(args.seq, common.model_config(shape).max_len),
                                  **({} if args.logits_chunk < 0 else {"logits_chunk": args.logits_chunk}))
        batch = make_batch(b, args.seq, cfg.vocab_size)
        params0, lora_step = ours_lora(cfg, batch, optim_cfg, args.lora)
        model, _, full_step = ours(cfg, batch, optim_cfg)
        with tempfile.TemporaryDirectory() as tmp:
            peft_step = theirs_lora(model, params0, batch, optim_cfg, tmp, args.lora)
        del params0
        fns = {"lora": lora_step, "peft": peft_step, "full": full_step}
        first = {k: f(-1) for k, f in fns.items()}
        for _ in range(args.warmup):
            for f in fns.values():
                f(-1)
        times = common.time_alternately(fns, args.reps, args.settle)
        rate = {k: [b * args.seq / t for t in v] for k, v in times.items()}
        med = {k: common.median(v) for k, v in times.items()}
        table.row([f"{shape} ({cfg.num_layers}L d{cfg.d_model} V{cfg.vocab_size})", f"{b}x{args.seq}",
                   common.cell(rate["lora"]), common.cell(rate["peft"]), common.cell(rate["full"]),
                   f"{med['peft'] / med['lora']:.2f}x", f"{med['lora'] / med['full']:.2f}x"])
        notes.append(f"{shape}: first-step loss ours LoRA {first['lora']:.5f}, peft {first['peft']:.5f}, ours full "
                     f"{first['full']:.5f}")
        del fns, lora_step, peft_step, full_step
    print()
    for n in notes:
        print("- " + n)


def theirs(model, params, batch, optim_cfg, tmpdir):
    """(step(rep) for eager, step for torch.compile or the reason it failed) on a GPT2LMHeadModel."""
    import torch
    import torch.nn.functional as F
    tmodel = common.to_transformers(model, params, tmpdir).train()
    opt = torch.optim.AdamW(tmodel.parameters(), lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2),
                            eps=optim_cfg.eps, weight_decay=0.0)
    x = torch.from_numpy(batch["tokens"]).long()
    y = torch.from_numpy(np.where(batch["loss_mask"] == 1, batch["targets"], -100)).long()

    def make_step(m):
        def step(_rep):
            opt.zero_grad(set_to_none=True)
            logits = m(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tmodel.parameters(), optim_cfg.grad_clip)
            opt.step()
            return float(loss.detach())
        return step

    return make_step(tmodel), make_step, tmodel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2", help="comma-separated presets (config_lib.PRESETS)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", default="tiny=32,gpt2=8", help="per-shape batch, e.g. tiny=32,gpt2=8")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--lora", type=int, default=0, help="> 0: LoRA of this rank vs peft (see the docstring)")
    parser.add_argument("--logits_chunk", type=int, default=-1,
                        help="model.logits_chunk (-1 = the preset's: 0 for tiny, 512 for gpt2)")
    common.add_cores_flag(parser)
    args = parser.parse_args()
    common.pin_cores(args.cores)
    threads = common.set_torch_threads()
    import torch
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    optim_cfg = config_lib.optim_config(1e-4)

    print(common.machine_line())
    if args.lora:
        return main_lora(args, args.shapes.split(","), batches, optim_cfg)
    print(f"SFT train step, seq {args.seq}, float32, dropout off, {threads} threads each, {args.reps} reps "
          f"(alternating), tokens/s = batch*seq/step time\n")
    table = common.Table(["shape", "batch", "ours tok/s", "torch eager tok/s", "torch.compile tok/s",
                          "ours / eager", "ours / compile"])
    ratios, notes = [], []
    for shape in args.shapes.split(","):
        b = int(batches.get(shape, 8))
        cfg = common.model_config(shape, max_len=max(args.seq, common.model_config(shape).max_len),
                                  **({} if args.logits_chunk < 0 else {"logits_chunk": args.logits_chunk}))
        batch = make_batch(b, args.seq, cfg.vocab_size)
        model, params0, ours_step = ours(cfg, batch, optim_cfg)
        with tempfile.TemporaryDirectory() as tmp:
            eager_step, make_step, tmodel = theirs(model, params0, batch, optim_cfg, tmp)
        del params0
        # Same weights, same batch: the first losses agree (a check that both train the same model).
        loss_ours, loss_eager = ours_step(-1), eager_step(-1)
        fns = {"ours": ours_step, "eager": eager_step}
        compile_note = "skipped (--no-compile)"
        if not args.no_compile:
            try:
                compiled_step = make_step(torch.compile(tmodel))
                compiled_step(-1)
                fns["compile"] = compiled_step
            except Exception as e:  # noqa: BLE001  (report why instead of failing the whole run)
                compile_note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        for _ in range(args.warmup):
            for f in fns.values():
                f(-1)
        times = common.time_alternately(fns, args.reps, args.settle)
        tok = b * args.seq
        rate = {k: [tok / t for t in v] for k, v in times.items()}
        r_eager = common.median(rate["ours"]) / common.median(rate["eager"])
        ratios.append(r_eager)
        comp = common.cell(rate["compile"]) if "compile" in rate else compile_note
        r_comp = (f"{common.median(rate['ours']) / common.median(rate['compile']):.2f}x" if "compile" in rate
                  else "n/a")
        table.row([f"{shape} ({cfg.num_layers}L d{cfg.d_model} V{cfg.vocab_size})", f"{b}x{args.seq}",
                   common.cell(rate["ours"]), common.cell(rate["eager"]), comp, f"{r_eager:.2f}x", r_comp])
        notes.append(f"{shape}: first-step loss ours {loss_ours:.5f} vs torch {loss_eager:.5f}; "
                     f"step time ours {common.median(times['ours']) * 1e3:,.1f} ms, "
                     f"eager {common.median(times['eager']) * 1e3:,.1f} ms")
        del fns, ours_step, eager_step, tmodel
    print()
    for n in notes:
        print("- " + n)
    print(f"\nratio: {min(ratios):.2f}")


if __name__ == "__main__":
    main()
