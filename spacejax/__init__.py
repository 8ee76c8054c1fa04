"""spacejax: self-play fine-tuning of language models (SPACE and SPIN) in JAX."""

__version__ = "0.1.0"
