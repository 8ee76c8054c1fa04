"""Hugging Face checkpoints <-> (ModelConfig, params), and tokenizer loading.

A Hugging Face directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json`. Linear weights are stored `[out, in]` in PyTorch; ours are Flax
kernels `[in..., out...]` with heads split out, and per-layer tensors are stacked on a leading
`layers` axis (the model scans over it). A LoRA adapter (spacejax.lora) is exported alone in
PEFT's format (`save_adapter`), for `peft.PeftModel.from_pretrained` on the base checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax
import jinja2
import numpy as np
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                   StrictDataclassError)
from huggingface_hub.file_download import REGEX_COMMIT_HASH
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from spacejax import data, integrity, lora, model, sharding, storage
from spacejax.config import ConfigError, LoraConfig, ModelConfig, RopeScaling

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2")
HF_CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                     "qwen2": transformers.Qwen2Config}
HF_MODEL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
CONFIG_FILE = "config.json"  # written last into an export: its presence marks a complete one
WEIGHT_FORMATS_NOT_READ = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".onnx")
SHARD_PATTERN = "model-*-of-*.safetensors"  # `_write_shards`' names, and those of save_pretrained
# config.json keys with no default that could be right: transformers would fill in a 7B shape
REQUIRED_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
REMOTE_CODE_KEY = "auto_map"  # transformers' pointer to a directory's own Python classes
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A Hugging Face checkpoint is unsupported, incomplete or misshapen; the message names what."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor and the params leaf it becomes.

    `linear_fan_in_dims` > 0 marks a PyTorch Linear weight `[out, in]`: our kernel is its
    transpose reshaped so that the first `linear_fan_in_dims` axes are the input.
    `merge_heads` marks a q/k/v bias, stored `[heads * head_dim]` and kept `[heads, head_dim]`.
    """

    hf_name: str
    path: tuple[str, ...]
    linear_fan_in_dims: int = 0
    merge_heads: bool = False


def tensor_map(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of a checkpoint for `cfg`; `{i}` in a name is the layer index."""
    layer = "model.layers.{i}."
    tensors = [Tensor("model.embed_tokens.weight", ("embed_tokens", "embedding")),
               Tensor("model.norm.weight", ("norm", "scale")),
               Tensor(layer + "input_layernorm.weight", ("layers", "input_layernorm", "scale")),
               Tensor(layer + "post_attention_layernorm.weight",
                      ("layers", "post_attention_layernorm", "scale"))]
    for name in ("q_proj", "k_proj", "v_proj"):
        tensors.append(Tensor(layer + f"self_attn.{name}.weight", ("layers", "self_attn", name, "kernel"), 1))
        if cfg.qkv_bias:
            tensors.append(Tensor(layer + f"self_attn.{name}.bias", ("layers", "self_attn", name, "bias"),
                                  merge_heads=True))
    tensors.append(Tensor(layer + "self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), 2))
    if cfg.out_bias:
        tensors.append(Tensor(layer + "self_attn.o_proj.bias", ("layers", "self_attn", "o_proj", "bias")))
    for name in ("gate_proj", "up_proj", "down_proj"):
        tensors.append(Tensor(layer + f"mlp.{name}.weight", ("layers", "mlp", name, "kernel"), 1))
    if not cfg.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", ("lm_head", "kernel"), 1))
    return tensors


def _to_hf(tensor: Tensor, leaf: np.ndarray) -> np.ndarray:
    """One layer's (or a global) params leaf -> the Hugging Face tensor."""
    if tensor.linear_fan_in_dims:
        fan_in = int(np.prod(leaf.shape[:tensor.linear_fan_in_dims]))
        return np.ascontiguousarray(leaf.reshape(fan_in, -1).T)
    if tensor.merge_heads:
        return np.ascontiguousarray(leaf.reshape(-1))
    return np.ascontiguousarray(leaf)


def _from_hf(tensor: Tensor, value: np.ndarray, leaf_shape: tuple[int, ...]) -> np.ndarray:
    if tensor.linear_fan_in_dims:
        value = value.T
    return value.reshape(leaf_shape)


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _is_layered(tensor: Tensor) -> bool:
    return "{i}" in tensor.hf_name


# ----------------------------------------------------------------------------------- config


def config_from_hf(hf_config: transformers.PretrainedConfig, **overrides) -> ModelConfig:
    """A transformers config -> ModelConfig; `overrides` set ModelConfig fields (dtypes, remat)."""
    arch = hf_config.model_type
    if arch not in SUPPORTED:
        raise CheckpointError(f"unsupported architecture {arch!r}; spacejax supports {list(SUPPORTED)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf_config.hidden_act!r}; only 'silu' (SwiGLU)")
    if getattr(hf_config, "mlp_bias", False):
        raise CheckpointError("unsupported mlp_bias=True; these families have no MLP bias")
    if arch == "qwen2" and getattr(hf_config, "use_sliding_window", False):
        raise CheckpointError("unsupported Qwen2 use_sliding_window=True (per-layer windows)")
    rope = dict(hf_config.rope_parameters or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    eos = hf_config.eos_token_id
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    fields = dict(
        architecture=arch,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        rms_norm_eps=float(hf_config.rms_norm_eps),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=hf_config.max_position_embeddings,
        sliding_window=getattr(hf_config, "sliding_window", None) if arch == "mistral" else None,
        qkv_bias=arch == "qwen2" or attention_bias,
        out_bias=arch == "llama" and attention_bias,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        bos_token_id=hf_config.bos_token_id,
        eos_token_ids=eos_ids,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def config_to_hf(cfg: ModelConfig) -> transformers.PretrainedConfig:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(rope_type="llama3", **dataclasses.asdict(cfg.rope_scaling))
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=(list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                      else cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        hidden_act="silu", architectures=[HF_MODEL_CLASSES[cfg.architecture]], dtype=cfg.param_dtype)
    if cfg.architecture == "llama":
        if cfg.qkv_bias != cfg.out_bias:
            raise CheckpointError("a llama checkpoint has bias on q, k, v and o together or on none; "
                                  f"got qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}")
        kwargs.update(attention_bias=cfg.qkv_bias)
    elif cfg.architecture == "mistral":
        kwargs.update(sliding_window=cfg.sliding_window)
    elif cfg.architecture == "qwen2" and (not cfg.qkv_bias or cfg.out_bias):
        raise CheckpointError("a qwen2 checkpoint has bias on q, k, v only: set qkv_bias=True, out_bias=False")
    return HF_CONFIG_CLASSES[cfg.architecture](**kwargs)


# ----------------------------------------------------------------------------------- tensors


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.exists():
        files = {name: path / file for name, file in _weight_map(index).items()}
        missing = sorted({file.name for file in files.values() if not file.exists()})
        if missing:
            raise CheckpointError(f"{index} names {missing[0]}, which is not in {path} ({len(missing)} shard(s) "
                                  "missing); download or export the model again")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}; spacejax reads safetensors "
                          "checkpoints (re-save a PyTorch .bin checkpoint with save_pretrained).")


def _read_tensors(files: dict[str, Path], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        with _open_safetensors(file) as f:
            for name in file_names:
                yield name, f.get_tensor(name)


def _weight_map(index) -> dict[str, str]:
    """{tensor name: shard file name} of a model.safetensors.index.json."""
    values = _read_json(index)
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map; download or export the model again")
    return weight_map


@contextlib.contextmanager
def _open_safetensors(file) -> Iterator:
    """safe_open(file) for numpy; a file that is cut short or not safetensors raises CheckpointError."""
    try:
        with safe_open(file, framework="numpy") as f:
            yield f
    except SafetensorError as error:
        raise CheckpointError(f"{file} is not a readable safetensors file ({error}); it is damaged or was cut "
                              "short: download or export the model again") from None


def is_export(path) -> bool:
    """Whether a directory holds a Hugging Face export: a complete one (config.json and its weights,
    one file or an index), or one cut short as `hf.save` replaced it (its manifest lists a config.json:
    `integrity.publish` removes config.json first and moves the new one in last)."""
    location = storage.location(path)
    if (location / CONFIG_FILE).exists() and any((location / name).exists() for name in (SINGLE_FILE, INDEX_FILE)):
        return True
    try:
        manifest = integrity.read(location)
    except integrity.IntegrityError:
        return False
    return manifest is not None and CONFIG_FILE in manifest["files"]


# ----------------------------------------------------------------------------------- init_from


def resolve_init_from(init_from: str | None, revision: str | None = None) -> str | None:
    """The directory a run's `init_from` (RunConfig) is read from, its `init_from_revision` checked:

    an existing directory (local or gs://, a Hugging Face model or a spacejax params checkpoint) is
        itself; a revision is accepted only for a Hugging Face cache snapshot,
        .../models--OWNER--NAME/snapshots/<commit>/, and must be its commit (a commit hash, or a
        branch or tag that the cache's refs/ map to it): any other directory has no revision to check;
    anything else is a Hugging Face hub id (OWNER/NAME): its snapshot at `revision` (a commit
        hash, branch or tag; default main) in the local Hugging Face cache (HF_HUB_CACHE). Nothing
        is downloaded: `hf download` it first.
    None, and a path that is not there and cannot be a hub id, stay as they are (for the caller
    to refuse). A ConfigError names init_from and what to do."""
    if init_from is None:
        return None
    location = storage.location(init_from)
    if location.exists():
        if revision is not None:
            _check_snapshot(location, revision, init_from)
        return init_from
    if not _is_hub_id(init_from):
        return init_from
    try:
        return snapshot_download(init_from, revision=revision, local_files_only=True)
    except LocalEntryNotFoundError as error:
        rev = revision or hub_constants.DEFAULT_REVISION
        problem = (f"its snapshot at revision {rev} in the Hugging Face cache is incomplete ({error})"
                   if isinstance(error, IncompleteSnapshotError) else
                   f"the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) has no snapshot of the hub id at revision "
                   f"{rev}")
        raise ConfigError(f"init_from: {init_from} is not a directory, and {problem}; download it first "
                          f"(hf download {init_from} --revision {rev}) or fix the path") from None


def _is_hub_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_pinned(revision: str | None) -> bool:
    """Whether a revision is a full commit hash (a branch or tag can move)."""
    return revision is not None and REGEX_COMMIT_HASH.fullmatch(revision) is not None


def _check_snapshot(location, revision: str, init_from: str) -> None:
    """A directory given with a revision must be the cache snapshot of that revision."""
    snapshots = location.parent
    if snapshots.name != "snapshots" or not snapshots.parent.name.startswith("models--"):
        raise ConfigError(f"init_from_revision={revision}: init_from {init_from} is a directory, not a Hugging Face "
                          "cache snapshot (.../models--OWNER--NAME/snapshots/<commit>/), so it has no revision to "
                          "check: drop init_from_revision, or set init_from to the hub id")
    commit = revision
    if not is_pinned(revision):
        ref = snapshots.parent / "refs" / revision
        if not ref.exists():
            raise ConfigError(f"init_from_revision={revision}: the cache of init_from {init_from} has no ref "
                              f"{revision} ({ref} not found); set init_from_revision to the snapshot's full commit "
                              "hash")
        commit = ref.read_text().strip()
    if commit != location.name:
        raise ConfigError(f"init_from_revision={revision} is commit {commit}, but init_from {init_from} is the "
                          f"snapshot of commit {location.name}: point init_from at snapshots/{commit}/ or fix "
                          "init_from_revision")


def load(path, **overrides) -> tuple[ModelConfig, dict]:
    """Load a Hugging Face checkpoint directory (local, or gs:// through a temporary download of
    its safetensors and json files) -> (ModelConfig, params of numpy arrays).

    `overrides` set ModelConfig fields, e.g. `param_dtype="bfloat16"`, `remat="full"`; params are
    cast to `param_dtype` (float32 unless overridden).
    """
    location = storage.location(path)
    if not (location / CONFIG_FILE).exists():
        raise CheckpointError(f"{location / CONFIG_FILE} not found: pass a Hugging Face model directory")
    hf_config = read_hf_config(location)  # checked before a gs:// download
    integrity.verify(location, required=False)  # an export spacejax wrote carries a manifest
    with storage.local_copy(location, skip_suffixes=WEIGHT_FORMATS_NOT_READ) as local:
        return _load_local(Path(local), hf_config, **overrides)


def read_hf_config(path) -> transformers.PretrainedConfig:
    """The transformers config of a Hugging Face directory's config.json (local or gs://). A file
    that is not JSON, lacks a shape key or asks for the directory's own code raises CheckpointError."""
    file = storage.location(path) / CONFIG_FILE
    values = _read_json(file)
    if not isinstance(values, dict):
        raise CheckpointError(f"{file} must hold a JSON object, got {type(values).__name__}; download or "
                              "export the model again")
    refuse_remote_code(file, values)
    kind = values.get("model_type")
    if kind not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{file}: model_type {kind!r} is not a transformers model type; spacejax reads "
                              f"{', '.join(SUPPORTED)}")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in values] if kind in SUPPORTED else []
    if missing:  # (another architecture is refused by name in config_from_hf)
        raise CheckpointError(f"{file} lacks {', '.join(missing)}; download or export the model again, or add "
                              "the keys of its architecture")
    try:
        return transformers.CONFIG_MAPPING[kind].from_dict(values)
    except (TypeError, ValueError, StrictDataclassError) as error:
        problem = " ".join(str(error).split())
        raise CheckpointError(f"{file}: {problem}; fix the value in the file") from None


def _read_json(file):
    """The JSON value of a file a checkpoint or tokenizer holds; a damaged one raises CheckpointError."""
    try:
        return json.loads(file.read_text())
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} is not valid JSON ({error}); the file is damaged: download or export "
                              "it again") from None


def refuse_remote_code(file, values) -> None:
    """spacejax never runs a model directory's own Python code (transformers' trust_remote_code):
    a config naming such code (`auto_map`) raises CheckpointError before transformers reads it."""
    if isinstance(values, dict) and values.get(REMOTE_CODE_KEY):
        raise CheckpointError(f"{file} has an {REMOTE_CODE_KEY}: this model needs its own Python code, and spacejax "
                              "never runs a model directory's own code; use a checkpoint of a supported "
                              f"architecture ({', '.join(SUPPORTED)}) without {REMOTE_CODE_KEY}")


def _load_local(path: Path, hf_config: transformers.PretrainedConfig, **overrides) -> tuple[ModelConfig, dict]:
    cfg = config_from_hf(hf_config, **overrides)
    files = _checkpoint_files(path)
    shapes = model.param_shapes(cfg)
    tensors = tensor_map(cfg)
    wanted = {}
    for tensor in tensors:
        for i in range(cfg.num_layers) if _is_layered(tensor) else [None]:
            wanted[tensor.hf_name.format(i=i)] = (tensor, i)
    missing = [name for name in wanted if name not in files]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensor {missing[0]!r} ({len(missing)} missing in all)")
    unused = [n for n in files if n not in wanted and not n.endswith(IGNORED_SUFFIXES)]
    if unused:
        log.warning("ignoring %d tensors of %s not used by the model, e.g. %s", len(unused), path, unused[0])

    params: dict = {}
    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16
    for name, value in _read_tensors(files, list(wanted)):
        tensor, layer = wanted[name]
        leaf_shape = _get(shapes, tensor.path).shape
        one_shape = leaf_shape[1:] if layer is not None else leaf_shape
        expected = _to_hf(tensor, np.zeros(one_shape, np.int8)).shape
        if tuple(value.shape) != expected:
            raise CheckpointError(f"tensor {name!r} in {files[name].name} has shape {tuple(value.shape)}, "
                                  f"expected {expected} from config.json")
        value = _from_hf(tensor, value, one_shape).astype(dtype)
        if layer is None:
            _set(params, tensor.path, value)
        else:
            if layer == 0:
                _set(params, tensor.path, np.empty(leaf_shape, dtype))
            _get(params, tensor.path)[layer] = value
    return cfg, params


def _hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy tensor) in the Hugging Face layout; collective: every process iterates it,
    and a leaf sharded across processes is gathered one layer at a time."""
    for tensor in tensor_map(cfg):
        leaf = _get(params, tensor.path)
        if _is_layered(tensor):
            for i in range(cfg.num_layers):
                yield tensor.hf_name.format(i=i), _to_hf(tensor, sharding.to_host(leaf[i]))
        else:
            yield tensor.hf_name, _to_hf(tensor, sharding.to_host(leaf))


def save(cfg: ModelConfig, params: dict, out_dir, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
         tokenizer=None) -> None:
    """Write config.json and safetensors (sharded with an index above `max_shard_bytes`) that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; optionally the tokenizer.
    `out_dir`: a local directory or a gs:// URL.

    Every process calls it (params sharded across processes are gathered); process 0 writes.
    Files are assembled in a staging folder (`integrity.staging_folder`: an export killed half-way
    is cleaned by the next) and published: config.json is removed, then the previous export's
    files, then a manifest of the new files (`integrity`) and the files move in, config.json last:
    a directory with config.json holds a complete export, verifiable against its manifest.json.
    """
    out_dir = storage.location(out_dir)
    writer = jax.process_index() == 0
    staging = integrity.staging_folder(out_dir) if writer else None
    try:
        tensors = _hf_tensors(cfg, params)
        if not writer:
            for _ in tensors:  # take part in every gather
                pass
            return
        config_to_hf(cfg).save_pretrained(staging)
        _write_shards(staging, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        # the weight files of an export without a manifest (an older spacejax, save_pretrained)
        earlier = [file.name for file in out_dir.glob(SHARD_PATTERN)] if out_dir.exists() else []
        integrity.publish(staging, out_dir, marker=CONFIG_FILE, stale=(SINGLE_FILE, INDEX_FILE, *earlier))
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _write_shards(out_dir: Path, tensors: Iterator[tuple[str, np.ndarray]], max_shard_bytes: int) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    shard_bytes = 0
    total = 0
    for name, value in tensors:
        if shards[-1] and shard_bytes + value.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = value
        shard_bytes += value.nbytes
        total += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], out_dir / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def load_tokenizer(path) -> transformers.PreTrainedTokenizerBase:
    """A tokenizer from a local directory or a gs:// one (downloaded less its weights; nothing
    from the Hugging Face Hub, and never the directory's own code: `refuse_remote_code`). A chat
    template that jinja cannot compile or that its sandbox refuses raises CheckpointError here."""
    location = storage.location(path)
    if not location.is_dir():
        raise FileNotFoundError(f"tokenizer directory {location} not found")
    for name in (TOKENIZER_CONFIG_FILE, CONFIG_FILE):  # AutoTokenizer reads both
        if (location / name).exists():
            refuse_remote_code(location / name, _read_json(location / name))
    with storage.local_copy(location, skip_suffixes=WEIGHT_FORMATS_NOT_READ + (".safetensors",)) as local:
        tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(local), local_files_only=True,
                                                               trust_remote_code=False)
    _check_chat_template(tokenizer, location)
    return tokenizer


def _check_chat_template(tokenizer, location) -> None:
    """Render a one-user-turn conversation with the tokenizer's chat template (a single template;
    a dict of named ones is left to its use): one jinja cannot compile, or that touches what its
    sandbox refuses, can never render, so it is named now rather than mid-run."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}], add_generation_prompt=True,
                                      tokenize=False)
    except data.UNRENDERABLE as error:
        raise CheckpointError(f"{location}: {data.template_problem(error)}") from None
    except jinja2.TemplateError:
        pass  # the template's own refusal of this conversation (raise_exception): a row's problem, met in use


# ----------------------------------------------------------------------------------- PEFT adapters

ADAPTER_CONFIG_FILE = "adapter_config.json"  # written last into an adapter export: marks a complete one
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # a PeftModel wraps the ...ForCausalLM: its module names gain this


def _target_tensor(cfg: ModelConfig, target: str) -> Tensor:
    """The Hugging Face weight that a LoRA target ("q", ..., "down") adapts: its kernel's entry
    in `tensor_map`, the one source of Hugging Face names."""
    path, fan_in_dims = lora.TARGETS[target]
    (tensor,) = [t for t in tensor_map(cfg) if t.path == path]
    # a [*in, r] and b [r, *out] split the kernel's axes where _to_hf splits the kernel's
    assert tensor.linear_fan_in_dims == fan_in_dims, (target, tensor)
    return tensor


def _module_name(tensor: Tensor) -> str:
    """The Linear module holding a weight: "model.layers.{i}.self_attn.q_proj.weight" ->
    "model.layers.{i}.self_attn.q_proj"."""
    return tensor.hf_name.removesuffix(".weight")


def _peft_tensors(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapters: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, numpy tensor) for each layer of each target: lora_A [r, in] and lora_B [out, r],
    flattened like the kernel so that (alpha / r) * lora_B @ lora_A is `_to_hf` of our delta
    [*in, *out], the Hugging Face weight's change [out, in]. Collective like `_hf_tensors`."""
    for target in lora_cfg.targets:
        kernel = _target_tensor(model_cfg, target)
        # a [*in, r] -> [r, in] as the kernel's input side; b [r, *out] -> [out, r] as its output side
        sides = {"lora_A": (kernel, adapters[target]["a"]),
                 "lora_B": (dataclasses.replace(kernel, linear_fan_in_dims=1), adapters[target]["b"])}
        for i in range(model_cfg.num_layers):
            module = PEFT_PREFIX + _module_name(kernel).format(i=i)
            for side, (tensor, leaf) in sides.items():
                yield f"{module}.{side}.weight", _to_hf(tensor, sharding.to_host(leaf[i]))


def _adapter_config(model_cfg: ModelConfig, lora_cfg: LoraConfig, base_model_path) -> dict:
    """adapter_config.json: a plain LoRA (no bias, rslora, dora or dropout) on the targets' modules,
    named by their last component ("q_proj") as PEFT's own configs name them."""
    modules = [_module_name(_target_tensor(model_cfg, target)).rsplit(".", 1)[-1] for target in lora_cfg.targets]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
            "lora_dropout": lora_cfg.dropout, "target_modules": modules, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": None if base_model_path is None else os.fspath(base_model_path)}


def save_adapter(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapters: dict, out_dir,
                 base_model_path=None) -> None:
    """Write `adapters` ({target: {"a": [L, *in, r], "b": [L, r, *out]}}, spacejax.lora) alone in
    PEFT's format: adapter_model.safetensors and adapter_config.json, which
    `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base checkpoint (recorded as
    `base_model_name_or_path`). `out_dir`: a local directory or a gs:// URL.

    Every process calls it (adapters sharded across processes are gathered); process 0 writes.
    Files are assembled and published as by `save`, adapter_config.json last: a directory with
    adapter_config.json holds a complete adapter, verifiable against its manifest.json.
    """
    if set(adapters) != set(lora_cfg.targets):
        raise ValueError(f"adapters for {sorted(adapters)} do not match lora.targets {list(lora_cfg.targets)}")
    out_dir = storage.location(out_dir)
    writer = jax.process_index() == 0
    staging = integrity.staging_folder(out_dir) if writer else None
    try:
        tensors = dict(_peft_tensors(model_cfg, lora_cfg, adapters))  # every process takes part in every gather
        if not writer:
            return
        save_file(tensors, staging / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(_adapter_config(model_cfg, lora_cfg, base_model_path),
                                                              indent=2))
        integrity.publish(staging, out_dir, marker=ADAPTER_CONFIG_FILE)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
