"""A model directory as the commands read it: a Hugging Face directory or a spacejax params
checkpoint (local or gs://), with the tokenizer beside it or named apart."""

from __future__ import annotations

from typing import Callable, Optional

import jax

from spacejax import checkpoint, hf, storage
from spacejax.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def open_model(model, tokenizer=None) -> tuple[ModelConfig, Optional[object], Callable]:
    """`model`'s config and tokenizer (from `tokenizer`, else `model`'s own when it holds one, else
    None), before any weight is read: -> (config, tokenizer, load_params(shardings=None) ->
    (config, params), placed by `shardings` when given)."""
    model_dir = storage.location(model)
    if checkpoint.is_params_checkpoint(model_dir):
        cfg = checkpoint.load_config(model_dir)

        def load_params(shardings=None):
            return checkpoint.load_params(model_dir, shardings)
    elif (model_dir / "config.json").exists():
        cfg = hf.config_from_hf(hf.read_hf_config(model_dir))

        def load_params(shardings=None):
            loaded_cfg, params = hf.load(model_dir)
            return loaded_cfg, params if shardings is None else jax.device_put(params, shardings)
    else:
        raise FileNotFoundError(f"{model_dir} is neither a Hugging Face model directory (config.json) "
                                "nor a spacejax params checkpoint (model_config.json)")
    tokenizer_dir = tokenizer or (model_dir if has_tokenizer(model_dir) else None)
    return cfg, hf.load_tokenizer(tokenizer_dir) if tokenizer_dir else None, load_params


def has_tokenizer(directory) -> bool:
    return any((storage.location(directory) / name).exists() for name in TOKENIZER_FILES)


def end_ids(cfg: ModelConfig, tokenizer) -> list[int]:
    """Where generation stops: the model's eos ids and the tokenizer's eos."""
    ids = list(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
