"""Command line: `python -m instructgpt_jax.main --config=configs/sft.py:tiny --workdir=DIR`.

Overrides: `--config.train.num_steps=10 --config.mesh.fsdp=4` (unknown keys are errors).
Multi-host: every process runs the same command with --coordinator_address, --num_processes,
--process_id (or none of them, on TPU pods / SLURM where JAX discovers them itself).
"""
import importlib

from absl import app, flags, logging
from ml_collections import config_flags

import jax

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file: configs/<stage>.py:<preset>.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with auto-detection "
                                 "(TPU pods, SLURM) even without the flags above.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = {"pretrain": "sft", "sft": "sft", "rm": "rm", "ppo": "ppo", "pipeline": "miniature.pipeline"}


def initialize_distributed(coordinator, num_processes, process_id, auto=False):
    """jax.distributed.initialize from flags; a no-op on a single host."""
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


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:  # keep Orbax / TFDS info logs out of the progress bar
        logging.set_verbosity(logging.WARNING)
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value)
    config = _CONFIG.value
    if config.stage not in STAGES:
        raise app.UsageError(f"config.stage={config.stage!r}; valid: {', '.join(STAGES)}")
    logging.info("process %d/%d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
    stage = importlib.import_module(f"instructgpt_jax.{STAGES[config.stage]}")
    final = stage.train(config, _WORKDIR.value)
    shown = {k: v for k, v in (final or {}).items() if isinstance(v, float) and "per_sec" not in k}
    if jax.process_index() == 0 and shown:
        print(f"{config.stage} finished in {_WORKDIR.value}: " +
              ", ".join(f"{k}={v:.4g}" for k, v in sorted(shown.items())))


if __name__ == "__main__":
    app.run(main)
