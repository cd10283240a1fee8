"""Command line: `python -m instructgpt_jax.main --config=sft:tiny --workdir=DIR` (`--help` for more).

Overrides: `--config.train.num_steps=10 --config.mesh.fsdp=4` (unknown keys are errors).
Multi-host: every process runs the same command with --coordinator_address, --num_processes,
--process_id (or none of them, on TPU pods / SLURM where JAX discovers them itself).

A mistake the user made prints one line `error: <message>` on stderr and exits with status 2;
`--debug` (or INSTRUCTGPT_DEBUG=1) shows the traceback instead. User mistakes are: while
reading the config, absl flag errors, unknown config keys, and ValueError / KeyError /
FileNotFoundError raised by the config file; while running, errors.UserError, ValueError and
FileNotFoundError (errors.USER_ERRORS) and absl's app.UsageError (inconsistent multi-host flags).
Anything else is a bug and keeps its traceback.

SIGINT / SIGTERM during training end the current step, save its checkpoint, print one line
`interrupted by SIGTERM at step N; checkpoint saved in DIR; rerun the same command to resume` and
exit with 130 (SIGINT) / 143 (SIGTERM); a second Ctrl-C stops at once.
"""
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from instructgpt_jax import config_lib, errors  # jax is imported once the flags are good: mistakes show at once

_CONFIG = config_flags.DEFINE_config_file("config", None, "STAGE:PRESET (e.g. sft:finetune) or a config file "
                                          "path.py:PRESET.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (presets, the checkpoint's "
                                  "model, overrides) and exit without touching the workdir.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection "
                                 "(TPU pods, SLURM) even without the flags above.")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error (bad data, config, checkpoint) "
                           f"instead of one line; also {errors.DEBUG_ENV}=1.")
flags.mark_flags_as_required(["config"])

STAGES = {"pretrain": "sft", "sft": "sft", "rm": "rm", "dpo": "dpo", "simpo": "simpo", "ppo": "ppo",
          "pipeline": "miniature.pipeline"}
HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "-?")
HELP = """usage: python -m instructgpt_jax.main --config=STAGE:PRESET --workdir=DIR [--config.KEY=VALUE ...]
                                       [--print_config] [--debug] [multi-host flags]

Stages (--config=STAGE:PRESET; a config file path.py:PRESET works too):
  pretrain  next-token loss on raw text {{text}}
  sft       supervised fine-tuning on demonstrations {{prompt, response}} or {{messages}}
  rm        K-wise Bradley-Terry reward model on comparisons (K-wise ranks, chosen/rejected, HH, UltraFeedback)
  dpo       DPO / IPO / listwise Plackett-Luce on the same comparisons (config.dpo.loss_type)
  simpo     SimPO (reference-free, length-normalised reward; config.simpo.beta, gamma) on the same comparisons
  ppo       PPO / PPO-ptx against the reward model, on prompts {{prompt}} or {{messages}}
  grpo      critic-free RL (GRPO, Dr. GRPO, RLOO) against the reward model or a verifier
  pipeline  the whole method in miniature on the built-in synthetic world (no data needed)
  (config files here: {stages})

Presets:
  finetune   start from a checkpoint: the model, tokenizer and chat template come from
             --config.init.hf_path=DIR (SFT) or --config.init.from_workdir=RUN (later stages);
             sequence length from the data, schedule in epochs (train.num_epochs), bf16 compute
  tiny mini small   CPU-sized models trained from scratch, fast schedules
  {sizes}
             model sizes (GPT-3 and the Hugging Face families) with the paper's schedules

Main keys (--config.KEY=VALUE; unknown keys are errors, --print_config shows them all):
  init.hf_path, init.from_workdir      where the weights come from; ppo.rm_workdir: the reward model
  data.train, data.eval, data.ptx      JSONL / Parquet files ('builtin' = the built-in synthetic world's rows;
                                       data.eval '' = the last 5 % of train); data.fields renames columns
  data.tokenizer, data.chat_template   default: the checkpoint's / previous stage's
  data.seq_len, data.max_prompt_len    0 = measured on the data; data.max_bad_rows: malformed rows to skip
  train.num_steps, train.num_epochs, train.batch_size, train.grad_accum, train.log_every, train.checkpoint_every
  optim.lr, optim.warmup_frac, optim.end_lr_frac    model.dtype, model.remat    mesh.data, mesh.fsdp, mesh.tensor
  ppo.kl_coef, ppo.ptx_coef, ppo.advantage_estimator, ppo.group_size, ppo.max_new_tokens, ppo.reward, ppo.loss_agg
  dpo.beta, dpo.loss_type, dpo.ipo_token_mean, dpo.pl_normalize    simpo.beta, simpo.gamma
  lora.rank, lora.alpha, lora.targets, lora.base_dtype   LoRA / QLoRA (rank 0 = full fine-tuning; base_dtype
                                       float32 | bfloat16 | int8 | nf4); init.adapter: start from a PEFT adapter

Examples:
  python -m instructgpt_jax.main --config=sft:finetune --workdir=runs/sft \
      --config.init.hf_path=/path/to/hf_checkpoint --config.data.train=demos.jsonl
  python -m instructgpt_jax.main --config=rm:finetune --workdir=runs/rm \
      --config.init.from_workdir=runs/sft --config.data.train=comparisons.jsonl
  python -m instructgpt_jax.main --config=ppo:finetune --workdir=runs/ppo --config.init.from_workdir=runs/sft \
      --config.ppo.rm_workdir=runs/rm --config.data.train=prompts.jsonl --print_config

Interrupt with Ctrl-C or SIGTERM: the step finishes, a checkpoint is saved; rerun the same command to resume.
Flags: --workdir (required to run), --print_config, --debug (tracebacks of user errors), --distributed,
--coordinator_address / --num_processes / --process_id (multi-host); --helpfull lists absl's own flags.
"""


def print_help() -> None:
    sizes = [p for p in config_lib.PRESETS if p not in config_lib.CPU_PRESETS]
    lines, line = [], " "
    for name in sizes:  # wrapped preset names
        if len(line) + len(name) > 100:
            lines.append(line)
            line = " "
        line += f" {name}"
    sys.stdout.write(HELP.format(stages=", ".join(config_lib.stage_names()), sizes="\n  ".join(lines + [line]).strip()))


def explicit_keys(argv) -> list[str]:
    """The config keys the command line sets ('model.num_layers' for --config.model.num_layers=...)."""
    return [a.lstrip("-").split("=", 1)[0][len("config."):] for a in argv[1:]
            if a.startswith("-") and a.lstrip("-").startswith("config.")]


def _with_stage_configs(argv):
    """--config=sft:finetune (a bare stage name, from any directory) -> the installed configs' file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.lstrip("-").startswith("config=") and arg.startswith("-"):
            out[i] = arg.split("=", 1)[0] + "=" + config_lib.config_path(arg.split("=", 1)[1])
        elif arg.lstrip("-") == "config" and arg.startswith("-") and i + 1 < len(out):
            out[i + 1] = config_lib.config_path(out[i + 1])
    return out


def initialize_distributed(coordinator, num_processes, process_id, auto=False):
    """jax.distributed.initialize from flags; a no-op on a single host."""
    import jax

    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    if all(given):
        if not 0 <= process_id < num_processes:
            raise app.UsageError(f"--process_id={process_id} is out of range for --num_processes={num_processes} "
                                 f"(valid: 0..{num_processes - 1})")
        # Cross-process collectives for CPU devices (ignored by GPU / TPU backends). Must be set
        # before any backend is initialised, so no jax.devices() call comes before this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()


_debug_requested, _user_error = errors.debug_requested, errors.exit_user_error


def _flag_arg(argv, name: str):
    """The value of --name=VALUE / --name VALUE in argv (last one wins), or None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.lstrip("-").startswith(name + "=") and arg.startswith("-"):
            value = arg.split("=", 1)[1]
        elif arg.lstrip("-") == name and arg.startswith("-") and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _unknown_override(argv):
    """'config.a.b' of the first --config.a.b=... override naming no key, with the valid keys there."""
    try:
        config = flags.FLAGS["config"].parser.parse(_flag_arg(argv, "config"))
    except Exception:  # noqa: BLE001  (the config itself is broken: not an override problem)
        return None
    for arg in argv[1:]:
        name = arg.lstrip("-").split("=", 1)[0]
        if not (arg.startswith("-") and name.startswith("config.")):
            continue
        node, parts = config, name.split(".")[1:]
        for i, part in enumerate(parts):
            where = ".".join(["config"] + parts[:i])
            if not isinstance(node, ConfigDict):
                return f"{where} is a value, not a group of keys (--{name})"
            if part not in node:
                return (f"unknown config key '{where}.{part}' (--{name}); "
                        f"valid keys in {where}: {', '.join(sorted(node))}")
            node = node[part]
    return None


def _config_error(exc: Exception, argv):
    """One line describing a user's mistake in the flags / config, or None if `exc` is a bug."""
    root = exc
    while root.__cause__ or root.__context__:
        root = root.__cause__ or root.__context__
    if isinstance(exc, (KeyError, AttributeError)):  # ml_collections: an override naming no key
        unknown = _unknown_override(argv)
        if unknown or isinstance(exc, AttributeError):
            return unknown
        return errors.one_line(exc)
    if isinstance(exc, flags.Error):
        prefix, whilst, _ = str(exc).partition(": Error whilst parsing config file")
        if not whilst:  # absl's own one-line message (unknown flag, bad value, missing --workdir)
            return errors.one_line(exc)
        return f"{prefix}: {errors.one_line(root)}" if isinstance(root, errors.CONFIG_ERRORS) else None
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):  # config_flags' deferred load error
        path = (_flag_arg(argv, "config") or "").split(":", 1)[0]
        if path and not os.path.isfile(path):
            return f"config file {path!r} does not exist (--config={_flag_arg(argv, 'config')})"
        return errors.one_line(root) if isinstance(root, errors.CONFIG_ERRORS) else None
    return errors.one_line(exc) if isinstance(exc, errors.CONFIG_ERRORS) else None


def parse_flags(argv):
    """absl's flag parsing, with the config's mistakes shown as one line and status 2."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print_help()
        sys.exit(0)
    argv = _with_stage_configs(argv)
    try:
        args = flags.FLAGS(argv)
        _CONFIG.value.stage  # config_flags defers a config file's load error to first use  # noqa: B018
        return args
    except Exception as e:  # noqa: BLE001  (sorted below: bugs are re-raised)
        message = _config_error(e, argv)
        if message is None or _debug_requested(argv):
            raise
        _user_error(message)


def main(argv):
    import jax  # the flags are good by now

    from instructgpt_jax import train_lib
    try:
        run(argv)
    except errors.USER_ERRORS + (app.UsageError,) as e:
        if _debug_requested(argv):
            raise
        _user_error(errors.one_line(e))
    except train_lib.Interrupted as e:  # SIGINT / SIGTERM in training: the step is saved, no traceback
        if jax.process_index() == 0:
            sys.stderr.write(f"{e}\n")
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (data preparation, export)
        sys.stderr.write("interrupted by SIGINT; rerun the same command to resume from the last checkpoint\n")
        sys.exit(128 + 2)


def run(argv):
    """Runs the stage the parsed flags name."""
    del argv
    import jax

    if not flags.FLAGS["verbosity"].present:  # keep Orbax / TFDS info logs out of the progress bar
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config.stage not in STAGES:
        raise errors.UserError(f"config.stage={config.stage!r}; valid: {', '.join(STAGES)}")
    if config.stage != "pipeline":  # the checkpoint's model adopted, data paths checked: before any work
        from instructgpt_jax import harness
        config = harness.resolve(config, explicit_keys(sys.argv), strict=not _PRINT_CONFIG.value)
    if _PRINT_CONFIG.value:
        sys.stdout.write(str(config))
        if config.get("model", {}).get("preset") == config_lib.FROM_CHECKPOINT and not (
                config.init.hf_path or config.init.from_workdir):
            sys.stderr.write("note: config.model is a placeholder until config.init.hf_path or "
                             "config.init.from_workdir names the checkpoint it comes from\n")
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required to run a stage (--print_config needs none)")
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    stage = importlib.import_module(f"instructgpt_jax.{STAGES[config.stage]}")
    if config.stage == "pipeline":
        final = stage.train(config, _WORKDIR.value)
    else:  # data paths set to 'builtin' read the built-in miniature world's rows
        from instructgpt_jax.miniature import world
        final = stage.train(config, _WORKDIR.value, builtin_data=world.builtin_rows)
    shown = {k: v for k, v in (final or {}).items() if isinstance(v, float) and "per_sec" not in k}
    if jax.process_index() == 0 and shown:
        print(f"{config.stage} finished in {_WORKDIR.value}: " +
              ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
