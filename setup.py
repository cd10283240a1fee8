"""instructgpt_jax: the InstructGPT pipeline (SFT -> RM -> PPO-ptx) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="instructgpt_jax",
    version="0.1.0",
    description="InstructGPT (Ouyang et al. 2022) end to end in JAX/Flax: SFT, K-choose-2 reward model, PPO-ptx.",
    # configs/ ships inside the package as instructgpt_jax.configs (one copy: `--config=sft:finetune` anywhere)
    packages=find_packages(include=["instructgpt_jax", "instructgpt_jax.*"]) + ["instructgpt_jax.configs"],
    package_dir={"instructgpt_jax.configs": "configs"},
    package_data={"instructgpt_jax": ["tasks/*.yaml"]},  # the `instructgpt` lm-eval task group
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "sentencepiece",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # TFDS needs it when TensorFlow is absent
        "array_record",
        "grain>=0.2.18",
        "numpy",
        "tqdm",
        "tensorboardX",
        "safetensors",
        "tokenizers",  # Hugging Face tokenizer.json (GPT-2, Llama-3, Qwen, Pythia, ...)
        "jinja2",  # checkpoints' chat templates (sandboxed)
        "pyarrow",  # Parquet data
        "matplotlib",
    ],
    extras_require={
        # torch (CPU build) and transformers are references for the parity tests only.
        "test": ["pytest", "nbclient", "nbformat", "ipykernel", "torch==2.13.0", "transformers",
                 "lm-eval==0.4.13", "accelerate",  # the eval parity tests run lm-eval's own `hf` backend
                 "peft"],  # LoRA adapters exported with `hf --adapter` load in peft (parity test)
        "eval": ["lm-eval==0.4.13"],  # python -m instructgpt_jax.eval (its core needs no torch)
        "bench": ["torch==2.13.0", "transformers", "trl<1.13"],  # trl 1.13 dropped PPOTrainer
        "hf": ["torch==2.13.0", "transformers"],
    },
)
