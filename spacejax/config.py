"""Frozen dataclasses that are the schema of a run.

This module is the ground floor: it imports nothing from spacejax.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional

ARCHITECTURES = ("llama", "mistral", "qwen2")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling (`rope_type: llama3` in Hugging Face)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama / Mistral / Qwen2 families.

    `architecture` decides only what Hugging Face class a checkpoint is exported as; the
    differences between the families are the explicit switches below:
    Mistral sets `sliding_window`, Qwen2 sets `qkv_bias`, Llama 3 sets `rope_scaling`.
    """

    architecture: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_position_embeddings: int = 2048
    sliding_window: Optional[int] = None  # keys with q_pos - k_pos >= window are masked
    qkv_bias: bool = False  # Qwen2: bias on q, k, v projections
    out_bias: bool = False  # Llama with attention_bias=True: bias on o_proj too
    tie_word_embeddings: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype; log-softmax and losses are always float32
    remat: str = "none"  # "none" | "full" (recompute the block) | "dots" (save matmul outputs)
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these

    def __post_init__(self):
        check_choice("model.architecture", self.architecture, ARCHITECTURES)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        check_choice("model.param_dtype", self.param_dtype, DTYPES)
        check_choice("model.dtype", self.dtype, DTYPES)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or null, got {self.sliding_window}")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def to_dict(config) -> dict:
    """A config dataclass as plain JSON/YAML-ready data (tuples become lists)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from plain data, checking keys and types; errors name the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys of {prefix or 'the config'}: "
                          f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**values)


def _coerce(hint, value, key: str):
    """Check `value` against the annotation `hint`; nested dataclasses are built recursively."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, value, key)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {hint.__name__}, got {value!r}")
    return value
