"""Time per PPO iteration, split into rollout (sampling) / scoring / update: ours vs TRL's PPOTrainer.

    python benchmarks/ppo_iteration.py [--shapes tiny,gpt2] [--batch 16] [--minibatch 8] [--epochs 1]
                                       [--prompt 32] [--response 96] [--reps 3] [--no-trl]

One iteration = sample `--batch` responses of exactly `--response` tokens (no EOS stopping on either
side) to left-padded random prompts, score them (reference log-probs, values, reward-model score,
KL-shaped rewards, GAE, whitening), then `--epochs` passes of minibatch PPO updates of the policy and
the value model. Policy and reference have the `--shapes` preset's shape (`gpt2` = GPT-2 124M);
reward and value models are the same shape with a scalar head. Random weights, identical in both
frameworks (ours written with `hf.save_pretrained`, loaded by transformers). No ptx term (TRL has none).

Ours: exactly the pieces `ppo.train` runs (`sampling.make_sampler`, `ppo.rollout_stats` jitted,
`ppo.update_step` jitted with donated state, on the stage's mesh), config from `configs/ppo.py`.
rollout = the sampler call; scoring = `rollout_stats` (+ its metrics read back to the host, as the
loop does); update = all minibatch steps (+ metrics to the host, KL-controller update).

TRL (`trl.experimental.ppo.PPOTrainer`, the last release that has it is trl 1.12; removed in 1.13):
one `trainer.train()` call of one iteration (total_episodes = batch), phases timed by wrapping the
trainer module's `batch_generation` (rollout) and its first gradient-mode `forward` (start of the
update); scoring is the time between them, update runs to the end of the step (on_step_end).
TRL keeps the sampling logits and does not recompute the policy's log-probs; ours does, with one
more forward pass in scoring. If TRL is not installed or does not run, the table says why.

Both are warmed up (one full iteration each), then run alternately, one iteration each in turn.
Prints a markdown table (median, min-max seconds) and `ratio: X` = TRL / ours total iteration time
at the last shape (> 1: ours is faster), or the ours-only total when TRL cannot run.
"""
import argparse
import contextlib
import functools
import importlib.util
import io
import os
import tempfile
import time

import common
import jax
import jax.numpy as jnp

from instructgpt_jax import config_lib, ppo, rl, sampling, sharding, train_lib
from instructgpt_jax.models import Transformer


def ppo_config(preset, args):
    spec = importlib.util.spec_from_file_location("ppo_config", os.path.join(common.ROOT, "configs", "ppo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return config_lib.replace(mod.get_config(preset), **{
        "train.batch_size": args.batch, "ppo.minibatch_size": args.minibatch, "ppo.ppo_epochs": args.epochs,
        "data.max_prompt_len": args.prompt, "ppo.max_new_tokens": args.response, "ppo.ptx_coef": 0.0,
        "train.progress": False})


class Ours:
    """ppo.train's rollout / scoring / update, one iteration per call, phases timed separately."""

    def __init__(self, config, cfg):
        self.config, cfg_ppo = config, config.ppo
        self.mesh = mesh = sharding.make_mesh(config.mesh)
        policy, rm_model = Transformer(cfg), Transformer(cfg, head="scalar")
        dummy = jnp.zeros((1, 8), jnp.int32)
        sft_params, _ = sharding.init_sharded(lambda r: policy.init(r, dummy)["params"], jax.random.PRNGKey(0), mesh)
        rm_params, _ = sharding.init_sharded(lambda r: rm_model.init(r, dummy)["params"], jax.random.PRNGKey(1), mesh)
        self.m = m = {"policy": policy, "rm_model": rm_model, "sft_params": sft_params, "rm_params": rm_params,
                      "rm_bias": 0.0}
        policy_tx = train_lib.make_optimizer(config.optim, config.train.num_steps)
        value_tx = train_lib.make_optimizer(config.value_optim, config.train.num_steps)
        self.state, shardings = sharding.place(ppo.init_state(m, policy_tx, value_tx, config), mesh)
        self.sampler = sampling.make_sampler(policy, max_new_tokens=cfg_ppo.max_new_tokens, eos_id=-1, pad_id=0,
                                             temperature=cfg_ppo.temperature, top_k=cfg_ppo.top_k, top_p=cfg_ppo.top_p)
        self.stats_fn = jax.jit(functools.partial(ppo.rollout_stats, policy=policy, value_model=rm_model,
                                                  rm_model=rm_model, rm_bias=0.0, cfg=cfg_ppo))
        repl = sharding.replicated(mesh)
        self.update_fn = jax.jit(functools.partial(ppo.update_step, policy=policy, value_model=rm_model,
                                                   policy_tx=policy_tx, value_tx=value_tx, cfg=cfg_ppo,
                                                   prompt_len=config.data.max_prompt_len),
                                 in_shardings=(shardings, None, None, None, repl), out_shardings=(shardings, repl),
                                 donate_argnums=0)
        self.kl_update = jax.jit(functools.partial(rl.kl_update, target=cfg_ppo.kl_target or None,
                                                   horizon=cfg_ppo.kl_horizon), out_shardings=repl)
        self.increment = jax.jit(lambda x: x + 1, out_shardings=repl)
        tokens, mask = common.prompts(config.train.batch_size, config.data.max_prompt_len, cfg.vocab_size)
        self.prompts = sharding.host_to_global({"prompt_tokens": tokens, "prompt_mask": mask}, mesh)
        self.phases = {"rollout": [], "scoring": [], "update": [], "total": []}

    def iteration(self, rep):
        config, cfg, state, m = self.config, self.config.ppo, self.state, self.m
        it_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), rep + 10)
        no_ptx = {"tokens": jnp.zeros((1, 1), jnp.int32)}
        n_mb = config.train.batch_size // cfg.minibatch_size
        with sharding.use(self.mesh):
            t0 = time.perf_counter()
            g = self.prompts
            sample = self.sampler(state["policy"]["params"], g["prompt_tokens"], g["prompt_mask"],
                                  jax.random.fold_in(it_rng, 0))
            sample = jax.block_until_ready(sample)
            t1 = time.perf_counter()
            sample["prompt_mask"] = g["prompt_mask"]
            batch, r_metrics = self.stats_fn(state["policy"]["params"], m["sft_params"], state["value"]["params"],
                                             m["rm_params"], sample, state["kl_beta"])
            r_metrics = jax.device_get(r_metrics)
            jax.block_until_ready(batch)
            t2 = time.perf_counter()
            u_metrics = []
            for epoch in range(cfg.ppo_epochs):
                perm = jax.random.permutation(jax.random.fold_in(it_rng, 1 + epoch), config.train.batch_size)
                for j in range(n_mb):
                    idx = perm[j * cfg.minibatch_size:(j + 1) * cfg.minibatch_size]
                    state, mb = self.update_fn(state, batch, idx, no_ptx, jax.random.fold_in(it_rng, 100 + j))
                    u_metrics.append(mb)
            u_metrics = jax.device_get(u_metrics)
            state["kl_beta"] = self.kl_update(state["kl_beta"], r_metrics["kl"], config.train.batch_size)
            state["step"] = self.increment(state["step"])
            jax.block_until_ready(state)
            t3 = time.perf_counter()
        self.state = state
        if rep >= 0:
            for k, v in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                self.phases[k].append(v)


class Trl:
    """TRL's PPOTrainer on the same weights, one iteration per `trainer.train()` call."""

    def __init__(self, ours: Ours, config, tmpdir):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        import datasets
        import torch
        from transformers import PrinterCallback, ProgressCallback
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as mod

        m, cfg_ppo = ours.m, config.ppo
        lm = lambda: common.to_transformers(m["policy"], m["sft_params"], os.path.join(tmpdir, "lm"))
        sc = lambda: common.to_transformers(m["rm_model"], m["rm_params"], os.path.join(tmpdir, "rm"),
                                            head="scalar")
        policy, ref, reward, value = lm(), lm(), sc(), sc()
        for model in (policy, ref):
            model.generation_config.eos_token_id = None  # stop_token None: full-length responses
            model.generation_config.bos_token_id = None
            model.generation_config.pad_token_id = 0

        b, mb = config.train.batch_size, cfg_ppo.minibatch_size
        args = PPOConfig(output_dir=os.path.join(tmpdir, "out"), report_to="none", save_strategy="no",
                         use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, logging_steps=1,
                         learning_rate=config.optim.lr, lr_scheduler_type="constant",
                         per_device_train_batch_size=b, gradient_accumulation_steps=1, num_mini_batches=b // mb,
                         local_rollout_forward_batch_size=b, total_episodes=b, num_ppo_epochs=cfg_ppo.ppo_epochs,
                         response_length=cfg_ppo.max_new_tokens, temperature=cfg_ppo.temperature,
                         stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
                         kl_coef=cfg_ppo.kl_coef, cliprange=cfg_ppo.clip_eps, cliprange_value=cfg_ppo.value_clip_eps,
                         vf_coef=cfg_ppo.value_coef, gamma=cfg_ppo.gamma, lam=cfg_ppo.gae_lambda, seed=0)
        tokens, _ = common.prompts(b, config.data.max_prompt_len, m["policy"].cfg.vocab_size)  # pads are 0 = pad id
        data = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})

        class Tokenizer:  # all PPOTrainer needs from a tokenizer here (no decoding: no sample generations)
            pad_token_id = 0
            eos_token_id = m["policy"].cfg.vocab_size - 1  # only counted in its metrics (stop_token=None)

        collate = lambda rows: {"input_ids": torch.tensor([r["input_ids"] for r in rows])}
        self.trainer = PPOTrainer(args=args, processing_class=Tokenizer(), model=policy, ref_model=ref,
                                  reward_model=reward, value_model=value, train_dataset=data, eval_dataset=data,
                                  data_collator=collate)
        for cb in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(cb)
        self.phases = {"rollout": [], "scoring": [], "update": [], "total": []}
        marks = self.marks = {}
        gen, fwd = mod.batch_generation, mod.forward

        def timed_generation(*a, **k):
            marks["gen_start"] = time.perf_counter()
            out = gen(*a, **k)
            marks["gen_end"] = time.perf_counter()
            return out

        def timed_forward(*a, **k):
            if torch.is_grad_enabled() and "update_start" not in marks:
                marks["update_start"] = time.perf_counter()
            return fwd(*a, **k)

        mod.batch_generation, mod.forward = timed_generation, timed_forward
        from transformers import TrainerCallback

        class StepEnd(TrainerCallback):
            def on_step_end(self, *a, **k):
                marks["step_end"] = time.perf_counter()

        self.trainer.add_callback(StepEnd())

    def iteration(self, rep):
        self.marks.clear()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its '===training policy===' banner
            self.trainer.train()
        t1 = time.perf_counter()
        mk = self.marks
        if rep >= 0:
            self.phases["rollout"].append(mk["gen_end"] - mk["gen_start"])
            self.phases["scoring"].append(mk["update_start"] - mk["gen_end"])
            self.phases["update"].append(mk["step_end"] - mk["update_start"])
            self.phases["total"].append(t1 - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="tiny,gpt2")
    parser.add_argument("--batch", type=int, default=16, help="rollouts per iteration")
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1, help="PPO epochs per iteration")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--response", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true")
    common.add_cores_flag(parser)
    args = parser.parse_args()
    common.pin_cores(args.cores)
    try:
        threads = common.set_torch_threads()
        torch_ok = True
    except ImportError:
        threads, torch_ok = common.cpu_count(), False

    trl_reason = None
    if args.no_trl:
        trl_reason = "skipped (--no-trl)"
    elif not torch_ok:
        trl_reason = "torch not installed"
    else:
        try:
            os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
            import trl
            from trl.experimental.ppo import PPOTrainer  # noqa: F401
        except ImportError as e:
            trl_reason = (f"not runnable: {e}. PPOTrainer lives in trl.experimental.ppo in trl 0.2x-1.12 and was "
                          f"removed in trl 1.13; `pip install 'trl<1.13'`")
        else:
            del trl

    print(common.machine_line(torch_too=torch_ok))
    print(f"PPO iteration: {args.batch} rollouts of prompt {args.prompt} + response {args.response} (full length), "
          f"minibatch {args.minibatch}, {args.epochs} epoch(s), no ptx, float32, {threads} threads each, "
          f"{args.reps} reps (alternating); seconds\n")
    table = common.Table(["shape", "", "rollout s", "scoring s", "update s", "iteration s"])
    ratio, reasons = None, []
    for shape in args.shapes.split(","):
        config = ppo_config(shape, args)
        cfg = common.model_config(shape)
        ours = Ours(config, cfg)
        runners = {"ours": ours}
        reason = trl_reason
        if reason is None:
            try:
                tmp = tempfile.TemporaryDirectory()
                runners["TRL"] = Trl(ours, config, tmp.name)
            except Exception as e:  # noqa: BLE001
                reason = f"failed to build: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
        for name, r in list(runners.items()):  # warm-up (compiles ours)
            try:
                r.iteration(-1)
            except Exception as e:
                if name == "ours":
                    raise
                reason = f"failed to run: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
                del runners[name]
        common.time_alternately({k: r.iteration for k, r in runners.items()}, args.reps, args.settle)
        label = f"{shape} ({cfg.num_layers}L d{cfg.d_model} V{cfg.vocab_size})"
        for name in ("ours", "TRL"):
            if name in runners:
                ph = runners[name].phases
                table.row([label, name] + [common.cell(ph[k], "{:.2f}") for k in ("rollout", "scoring", "update",
                                                                                      "total")])
            else:
                table.row([label, name, reason, "", "", ""])
                reasons.append(f"{shape}: {reason}")
        if "TRL" in runners:
            ratio = common.median(runners["TRL"].phases["total"]) / common.median(ours.phases["total"])
            table.row([label, "TRL / ours"] + [
                f"{common.median(runners['TRL'].phases[k]) / common.median(ours.phases[k]):.2f}x"
                for k in ("rollout", "scoring", "update", "total")])
        del runners, ours
    if ratio is not None:
        print(f"\nratio: {ratio:.2f}")
    else:
        print("\nTRL: " + "; ".join(reasons))
        print("ratio: n/a")


if __name__ == "__main__":
    main()
