"""Time per PPO iteration, split into rollout (sampling) / scoring / update: ours vs TRL's PPOTrainer.

    python benchmarks/ppo_iteration.py [--shapes tiny,gpt2] [--batch 16] [--minibatch 8] [--chunk 0]
                                       [--epochs 1] [--prompt 32] [--response 96] [--reps 3] [--no-trl]

One iteration = sample `--batch` responses of exactly `--response` tokens (no EOS stopping on either
side) to left-padded random prompts, score them (reference log-probs, values, reward-model score,
KL-shaped rewards, GAE, whitening), then `--epochs` passes of minibatch PPO updates of the policy and
the value model. Policy and reference have the `--shapes` preset's shape (`gpt2` = GPT-2 124M);
reward and value models are the same shape with a scalar head. Random weights, identical in both
frameworks (ours written with `hf.save_pretrained`, loaded by transformers). No ptx term (TRL has none).

Ours: exactly the pieces `ppo.train` runs, config from `config_lib.load('ppo', preset)`, on the
stage's mesh: `sampling.make_sampler` called on chunks of `--chunk` rows (`ppo.rollout_chunk`; 0 = the
minibatch size) with each row's index as its `row_ids`, `ppo.rollout_forward` jitted on the same
chunks, `ppo.advantages` jitted, then `ppo.update_step` jitted with the state donated.
rollout = the sampler calls; scoring = `rollout_forward` + `advantages` + the update batch (+ the
metrics read back to the host, as the loop does); update = all minibatch steps (+ metrics to the host,
KL-controller update). `ppo.train` dispatches each chunk's forward pass right after its sampler call;
here all sampler calls are waited for first, so that the two phases can be timed apart (the same work).

TRL (`trl.experimental.ppo.PPOTrainer`, the last release that has it is trl 1.12; removed in 1.13):
one `trainer.train()` call of one iteration (total_episodes = batch; it samples and scores in chunks of
the same `--chunk` rows, its `local_rollout_forward_batch_size`), phases timed by wrapping the
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
import io
import os
import tempfile
import time

import common
import jax
import jax.numpy as jnp

from instructgpt_jax import config_lib, ppo, rl, sampling, scoring, sharding, train_lib
from instructgpt_jax.models import Transformer


def ppo_config(preset, args):
    return config_lib.load("ppo", preset, **{
        "train.batch_size": args.batch, "ppo.minibatch_size": args.minibatch, "ppo.rollout_chunk": args.chunk,
        "ppo.ppo_epochs": args.epochs, "data.max_prompt_len": args.prompt, "ppo.max_new_tokens": args.response,
        "ppo.ptx_coef": 0.0, "train.progress": False, "model.remat": "none"})  # TRL keeps activations too


class Ours:
    """ppo.train's rollout / scoring / update, one iteration per call, phases timed separately.
    The reward model is also the value model's init, as in `ppo.train` with an RM of the policy's tokenizer."""

    def __init__(self, config, cfg):
        self.config, cfg_ppo = config, config.ppo
        self.mesh = mesh = sharding.make_mesh(config.mesh)
        b = config.train.batch_size
        self.chunk = cfg_ppo.rollout_chunk or cfg_ppo.minibatch_size
        if b % cfg_ppo.minibatch_size or b % self.chunk:
            raise SystemExit(f"--batch {b} must be a multiple of --minibatch and --chunk")
        policy, rm_model = Transformer(cfg), Transformer(cfg, head="scalar")
        sft_params = sharding.init_model(policy, jax.random.PRNGKey(0), mesh)
        rm_params = sharding.init_model(rm_model, jax.random.PRNGKey(1), mesh)
        self.m = {"policy": policy, "rm_model": rm_model, "sft_params": sft_params, "rm_params": rm_params}
        updates = b // cfg_ppo.minibatch_size * cfg_ppo.ppo_epochs
        policy_tx = train_lib.make_optimizer(config.optim, config.train.num_steps, updates)
        value_tx = train_lib.make_optimizer(config.value_optim, config.train.num_steps, updates)
        state = ppo.init_state(sft_params, policy_tx, cfg_ppo.kl_coef, rm_params, value_tx)
        self.state, shardings = sharding.place(state, mesh)
        self.repl = sharding.replicated(mesh)
        # eos_id -1 is never sampled: full-length responses; the RM's appended EOS is a real token
        self.sampler = sampling.make_sampler(policy, max_new_tokens=cfg_ppo.max_new_tokens, eos_id=-1, pad_id=0,
                                             temperature=cfg_ppo.temperature, top_k=cfg_ppo.top_k, top_p=cfg_ppo.top_p)
        self.forward = jax.jit(functools.partial(ppo.rollout_forward, policy=policy, value_model=rm_model,
                                                 rm_model=rm_model, eos_id=cfg.vocab_size - 1,
                                                 temperature=cfg_ppo.temperature, rm_bias=0.0))
        self.advantages = jax.jit(functools.partial(ppo.advantages, cfg=cfg_ppo))
        self.update_fn = jax.jit(functools.partial(ppo.update_step, policy=policy, value_model=rm_model,
                                                   policy_tx=policy_tx, value_tx=value_tx, cfg=cfg_ppo,
                                                   prompt_len=config.data.max_prompt_len),
                                 in_shardings=(shardings, None, None, None), out_shardings=(shardings, self.repl),
                                 donate_argnums=0)
        tokens, mask = common.prompts(b, config.data.max_prompt_len, cfg.vocab_size)
        self.prompts = sharding.host_to_global({"prompt_tokens": tokens, "prompt_mask": mask}, mesh)
        self.phases = {"rollout": [], "scoring": [], "update": [], "total": []}
        self.steps = 0

    def score(self, state, samples):
        """ppo.train's rollout after sampling: forward passes per chunk, advantages, the update batch."""
        params = {"policy": state["policy"]["params"], "reference": self.m["sft_params"],
                  "rm": self.m["rm_params"], "value": state["value"]["params"]}
        parts = [dict(s, **self.forward(params, s)) for s in samples]
        s = {k: jnp.concatenate([x[k] for x in parts]) for k in parts[0]}
        adv, returns, metrics = self.advantages(s["scores"], s["old_logp"], s["ref_logp"], s["values"],
                                                s["response_mask"], s["ended"], state["kl_beta"])
        tokens, positions, segments = scoring.sequence_inputs(s["tokens"], s["prompt_mask"], s["response_mask"])
        batch = dict(tokens=tokens, positions=positions, segments=segments, mask=s["response_mask"],
                     old_logp=s["old_logp"], ref_logp=s["ref_logp"], advantages=adv, old_values=s["values"],
                     returns=returns)
        metrics["explained_variance"] = rl.explained_variance(s["values"], returns, s["response_mask"])
        return batch, {k: float(v) for k, v in jax.device_get(metrics).items()}

    def iteration(self, rep):
        config, cfg, state, chunk = self.config, self.config.ppo, self.state, self.chunk
        b = config.train.batch_size
        it_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), rep + 10)
        no_ptx = {"tokens": jnp.zeros((1, 1), jnp.int32)}
        n_mb = b // cfg.minibatch_size
        with sharding.use(self.mesh):
            t0 = time.perf_counter()
            g, samples = self.prompts, []
            for c in range(0, b, chunk):
                s = self.sampler(state["policy"]["params"], g["prompt_tokens"][c:c + chunk],
                                 g["prompt_mask"][c:c + chunk], jax.random.fold_in(it_rng, 0), jnp.arange(c, c + chunk))
                samples.append(dict(s, prompt_mask=g["prompt_mask"][c:c + chunk]))
            samples = jax.block_until_ready(samples)
            t1 = time.perf_counter()
            batch, metrics = self.score(state, samples)
            jax.block_until_ready(batch)
            t2 = time.perf_counter()
            updates = []
            for epoch in range(cfg.ppo_epochs):
                perm = jax.random.permutation(jax.random.fold_in(it_rng, 1 + epoch), b)
                for j in range(n_mb):
                    idx = perm[j * cfg.minibatch_size:(j + 1) * cfg.minibatch_size]
                    state, mb_metrics = self.update_fn(state, batch, idx, no_ptx)
                    updates.append(mb_metrics)
            jax.device_get(updates)
            beta = rl.kl_update(state["kl_beta"], metrics["kl"], b, target=cfg.kl_target or None,
                                horizon=cfg.kl_horizon)
            state["kl_beta"] = jax.device_put(jnp.float32(beta), self.repl)
            self.steps += 1
            state["step"] = jax.device_put(jnp.int32(self.steps), self.repl)
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
                         local_rollout_forward_batch_size=ours.chunk, total_episodes=b, num_ppo_epochs=cfg_ppo.ppo_epochs,
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
    parser.add_argument("--chunk", type=int, default=0,
                        help="rows per sampler call and rollout forward pass, both sides (0 = --minibatch)")
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
          f"minibatch {args.minibatch}, rollout chunk {args.chunk or args.minibatch}, {args.epochs} epoch(s), no ptx, "
          f"float32, {threads} threads each, {args.reps} reps (alternating); seconds\n")
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
