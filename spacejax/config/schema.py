"""Frozen dataclasses that are the schema of a run, checked as they are built, and their YAML files.

With `plain.py` this package is the ground floor: it imports nothing else from spacejax.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Optional

import yaml

from spacejax import storage
from spacejax.config.plain import ConfigError, from_dict, to_dict

ARCHITECTURES = ("llama", "mistral", "qwen2")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("auto", "reference", "dot_product", "splash")


def check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def positive(section: str, config, *keys: str) -> None:
    for key in keys:
        value = getattr(config, key)
        if not value > 0:  # NaN too
            raise ConfigError(f"{section}.{key} must be > 0, got {value}")


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
    # how attention is computed (spacejax.attention): auto picks per backend; reference is the einsum
    attention: str = "auto"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()  # generation stops at any of these

    def __post_init__(self):
        check_choice("model.architecture", self.architecture, ARCHITECTURES)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        check_choice("model.attention", self.attention, ATTENTION)
        check_choice("model.param_dtype", self.param_dtype, DTYPES)
        check_choice("model.dtype", self.dtype, DTYPES)
        positive("model", self, "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be positive or null, got {self.sliding_window}")


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """The known-truth task (toy.py): C contexts, a Markov chain over S symbols per context."""

    num_contexts: int = 4
    num_symbols: int = 8
    max_response_length: int = 12
    end_probability: float = 0.15  # mean probability of END after each symbol
    concentration: float = 0.5  # Dirichlet concentration of each row: lower is more peaked
    seed: int = 0  # fixes the task's distributions (not the run's randomness)

    def __post_init__(self):
        positive("data.toy", self, "num_contexts", "num_symbols")
        if self.max_response_length < 2:
            raise ConfigError(f"data.toy.max_response_length must be >= 2, got {self.max_response_length}")
        if not 0 < self.end_probability < 1:
            raise ConfigError(f"data.toy.end_probability must be in (0, 1), got {self.end_probability}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """The teacher task (teacher.py): the toy's token layout (C contexts, S symbols, END), with
    p_data a fixed random Llama of these sizes, its weights drawn from `seed` with std `init_std`
    and its logits divided by `temperature` (lower: more peaked); `end_logit` is added to END's."""

    num_contexts: int = 4
    num_symbols: int = 8
    max_response_length: int = 12
    hidden_size: int = 96  # 188k parameters: 2.5x configs/stability.yaml's student
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 24
    init_std: float = 0.1  # every weight matrix and the embedding; the norms at one
    temperature: float = 0.5
    end_logit: float = 0.0
    seed: int = 0  # fixes the teacher's weights (not the run's randomness)

    def __post_init__(self):
        positive("data.teacher", self, "num_contexts", "num_symbols", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim", "init_std", "temperature")
        if self.max_response_length < 2:
            raise ConfigError(f"data.teacher.max_response_length must be >= 2, got {self.max_response_length}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"data.teacher.num_heads ({self.num_heads}) must be a multiple of "
                              f"data.teacher.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"data.teacher.head_dim must be even for RoPE, got {self.head_dim}")


KNOWN_TRUTH_SOURCES = ("toy", "teacher")  # data.source values whose p_data is known exactly


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the real (prompt, response) pairs come from and how they are tokenized.

    `source`: "toy" (the known-truth task: a Markov chain, `toy`), "teacher" (the known-truth task
    whose p_data is a small fixed transformer, `teacher`), a .jsonl or .parquet file, a
    `datasets.save_to_disk` directory, or "tfds:NAME" (array_record files under `tfds_data_dir`).
    """

    source: str = "toy"
    split: Optional[str] = None
    tfds_data_dir: Optional[str] = None
    tokenizer: Optional[str] = None  # a local tokenizer directory; required for text sources
    num_train: int = 256  # N real pairs used by every iteration (0: all rows after the eval rows)
    # A fixed training subset (SPIN's 50k of UltraChat): a file of row ids, one a line (or a .json
    # list). The training rows are these, in the file's order (the first num_train of them; 0: all);
    # the num_eval held-out rows are drawn from the rows it does not list (spacejax.sources has the rules).
    row_ids: Optional[str] = None
    row_id_field: Optional[str] = None  # null: the ids are row positions (from 0); else a row field, e.g. prompt_id
    num_eval: int = 64  # held-out real pairs for per-iteration evaluation
    max_length: int = 1024
    max_prompt_length: int = 512
    buckets: tuple[int, ...] = (64, 128, 256, 512, 1024)
    skip_bad_rows: bool = False
    toy: ToyConfig = ToyConfig()
    teacher: TeacherConfig = TeacherConfig()

    @property
    def known_truth(self):
        """The section of a known-truth source (`toy` or `teacher`), else None."""
        return {"toy": self.toy, "teacher": self.teacher}.get(self.source)

    def __post_init__(self):
        positive("data", self, "num_eval", "max_length", "max_prompt_length")
        if self.num_train < 0:
            raise ConfigError(f"data.num_train must be >= 0, got {self.num_train}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"data.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"data.max_length ({self.max_length})")
        if self.row_id_field is not None and self.row_ids is None:
            raise ConfigError("data.row_id_field is set but data.row_ids is not: set data.row_ids to the file of "
                              "row ids, or drop data.row_id_field")
        truth = self.known_truth
        if truth is not None and self.max_length < 2 + truth.max_response_length:
            raise ConfigError(f"data.max_length ({self.max_length}) must hold a prompt [BOS, CONTEXT] and a response "
                              f"of data.{self.source}.max_response_length ({truth.max_response_length}) tokens")
        if self.row_ids is not None and self.source in KNOWN_TRUTH_SOURCES:
            raise ConfigError(f"data.row_ids selects rows of a data file, and data.source={self.source} has none: "
                              "set data.source to a file or drop data.row_ids")


PROMPT_FORMATS = ("chat", "spin")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the opponent generates synthetic responses (top_k 0 and top_p 1 switch those filters off).

    `prompt_format`: what the opponent generates from. "chat" (the default): the training prompt,
    the chat template's rendering. "spin": SPIN's generation prompt (`spacejax.data.SPIN_PROMPT`,
    spin/generate.py: "### Instruction: {prompt}\n\n### Response: ", no special tokens) for
    generation ONLY; the pairs are still scored and trained under the chat template, as SPIN does.
    This breaks the assumption that the synthetic responses are the opponent's samples under the
    prompt they are trained with (SPACE's estimator rests on it), so it is refused with
    loss.kind=space unless `force_prompt_format`. Fixed for a run (not in selfplay.from_iteration).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1  # K synthetic responses per prompt
    batch_size: int = 64
    prompt_format: str = "chat"  # chat | spin (SPIN's `### Instruction:` prompt, generation only)
    force_prompt_format: bool = False  # allow prompt_format=spin with loss.kind=space

    def __post_init__(self):
        positive("sampler", self, "max_new_tokens", "num_samples", "batch_size")
        check_choice("sampler.prompt_format", self.prompt_format, PROMPT_FORMATS)
        if self.temperature < 0:
            raise ConfigError(f"sampler.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"sampler.top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler.top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`kind` names a loss of `losses.LOSSES`; every other field is a setting (`Loss.defaults`) of
    the losses that take it, with the loss's default, and is ignored by the others. `beta` null
    takes that loss's own default."""

    kind: str = "space"
    mu: float = 1.0  # space only: the noise ratio
    beta: Optional[float] = None  # every loss but sft
    label_smoothing: float = 0.0  # dpo only
    spin_kind: str = "sigmoid"  # spin only: sigmoid | hinge (spin's `kind`; `loss.kind` names the loss)
    per_token: bool = False  # sft only: the token-mean NLL instead of the summed one

    def __post_init__(self):
        if not self.mu > 0:  # NaN too
            raise ConfigError(f"loss.mu must be > 0 (the noise ratio), got {self.mu}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        check_choice("loss.spin_kind", self.spin_kind, ("sigmoid", "hinge"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The player's optimisation inside one iteration. `batch_size` is the global number of
    pairs per optimizer step, split into `grad_accum_steps` micro-batches."""

    optimizer: str = "rmsprop"  # rmsprop (SPIN's recipe: no momentum, PyTorch's eps) | adamw
    learning_rate: float = 5e-7
    schedule: str = "linear"  # linear decay | cosine | constant, each after a linear warmup
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    epochs: int = 2
    batch_size: int = 64
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0  # 0 switches clipping off
    log_every: int = 1
    max_nonfinite_in_a_row: int = 5

    def __post_init__(self):
        check_choice("train.optimizer", self.optimizer, ("rmsprop", "adamw"))
        check_choice("train.schedule", self.schedule, ("linear", "cosine", "constant"))
        positive("train", self, "learning_rate", "epochs", "batch_size", "grad_accum_steps", "log_every",
                 "max_nonfinite_in_a_row")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be divisible by "
                              f"train.grad_accum_steps ({self.grad_accum_steps})")


MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch (and every activation's leading axis) is split over these
TENSOR_AXIS = "tensor"  # attention heads, the MLP and the vocabulary are split over this


def check_split(key: str, rows: int, divisor: int, when: str = "") -> None:
    """The one batch rule: a global batch of `rows` is split over the `divisor` devices of data x
    fsdp, so it must be a multiple of them; a ConfigError names `key` (and `when`) otherwise."""
    if rows % divisor:
        raise ConfigError(f"{key} = {rows}{when} is not divisible by mesh data x fsdp = {divisor}: make it "
                          f"a multiple of {divisor} or change mesh.data / mesh.fsdp")


def check_batch_sizes(cfg: RunConfig, divisor: int) -> None:
    """Every global batch is split over BATCH_AXES, so in every phase (`at_iteration`) the train
    micro-batch, the sampler batch and the held-out rows must each be a multiple of the `divisor`
    devices of data x fsdp; a ConfigError names the first key (and iteration) that is not."""
    for iteration in range(-1, cfg.selfplay.iterations):
        phase, when = at_iteration(cfg, iteration), f" (iteration {iteration})" if iteration >= 0 else ""
        micro_batch = phase.train.batch_size // phase.train.grad_accum_steps
        for key, rows in (("train.batch_size / train.grad_accum_steps", micro_batch),
                          ("sampler.batch_size", phase.sampler.batch_size), ("data.num_eval", phase.data.num_eval)):
            check_split(key, rows, divisor, when)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; one may be -1, filled from the device count."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = dataclasses.astuple(self)
        if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh sizes must be positive with at most one -1, got {self}")


SCHEDULED_SECTIONS = ("loss", "train", "sampler")  # what may change from one iteration to the next


@dataclasses.dataclass(frozen=True)
class SelfPlayConfig:
    """`from_iteration`: changes that take effect from a given iteration on, each "T: section.key=value"
    (T a 0-based iteration; the value is YAML, as in a command-line override; the sections are
    loss, train and sampler). SPIN's recipe lowers the learning rate at iteration 2 and raises beta
    at iteration 3: ["2: train.learning_rate=1e-7", "3: loss.beta=5.0"]. `at_iteration` applies them.
    An entry past the last iteration never takes effect (so `selfplay.iterations=2` runs the first
    two iterations of a longer recipe); its value is still checked at load time."""

    iterations: int = 3
    mix_previous: bool = False  # SPIN: add the previous iteration's synthetic pairs to this one's
    sft_epochs: int = 0  # SFT warm-up on the real data producing theta_0 (0: none)
    sft_learning_rate: float = 1e-3
    eval_kl_samples: int = 2000  # known-truth task: draws of p_data (kl) and of the model (reverse_kl)
    from_iteration: tuple[str, ...] = ()
    # What every phase is judged by (selfplay.evaluators.EVALUATORS): held-out NLL ("nll"), the loss
    # and rewards on held-out pairs ("pairs"), KL(p_data || p_theta) on the known-truth task ("kl"),
    # the quality of the model's own samples there ("reverse_kl": KL(p_theta || p_data), log p_data).
    # null: nll, pairs, and kl and reverse_kl where the task has a known p_data.
    evaluators: Optional[tuple[str, ...]] = None

    def __post_init__(self):
        positive("selfplay", self, "iterations", "sft_learning_rate", "eval_kl_samples")
        if self.sft_epochs < 0:
            raise ConfigError(f"selfplay.sft_epochs must be >= 0, got {self.sft_epochs}")
        for change in self.from_iteration:
            override = parse_scheduled(change)[1]
            section = override.partition("=")[0].strip().split(".")[0]
            if section not in SCHEDULED_SECTIONS:
                raise ConfigError(f"selfplay.from_iteration entry {change!r}: only {list(SCHEDULED_SECTIONS)} may "
                                  "change between iterations")


def parse_scheduled(change: str) -> tuple[int, str]:
    """"T: section.key=value" -> (T, "section.key=value")."""
    iteration, sep, override = change.partition(":")
    if not sep or not iteration.strip().isdigit() or "=" not in override:
        raise ConfigError(f"selfplay.from_iteration entry {change!r} must look like 'ITERATION: section.key=value'")
    return int(iteration), override.strip()


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # Orbax save of the train state inside an iteration
    keep: int = 2
    export_hf: bool = False  # also write workdir/hf/iter_XXX/ after each iteration
    export_adapter: bool = False  # with lora: also hf/iter_XXX_adapter/ (PEFT) and hf/theta_0/ (needs export_hf)

    def __post_init__(self):
        positive("checkpoint", self, "every_steps", "keep")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (spacejax.lora): `rank` null is off; a rank turns them on for `targets`
    (all seven projections by default). Adapters train, the base stays fixed within an iteration,
    and at its end the adapter is merged into the base in float32."""

    rank: Optional[int] = None
    alpha: float = 16.0  # the delta is (alpha / rank) * A B
    dropout: float = 0.0  # must be 0: the adapter is merged into the weights for the forward
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank is not None:
            positive("lora", self, "rank", "alpha")
        for target in self.targets:
            check_choice("lora.targets entry", target, LORA_TARGETS)
        if not self.targets:
            raise ConfigError("lora.targets must name at least one projection")
        if self.dropout != 0:
            raise ConfigError(f"lora.dropout must be 0 (got {self.dropout}): spacejax runs the forward on the merged "
                              "weights, where dropout on the adapter's input does not exist")

    @property
    def enabled(self) -> bool:
        return self.rank is not None


TRACKERS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Where a run's Weights & Biases run lives (`tracking.kinds` with wandb; the `wandb` extra)."""

    project: str = "spacejax"
    entity: Optional[str] = None
    name: Optional[str] = None  # null: wandb picks one
    mode: str = "online"  # online | offline (synced later with `wandb sync`) | disabled
    tags: tuple[str, ...] = ()

    def __post_init__(self):
        check_choice("tracking.wandb.mode", self.mode, WANDB_MODES)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where the run's records go: jsonl (the run's own log, always on), tensorboard
    (workdir/events/, the `tensorboard` extra), wandb (process 0 only)."""

    kinds: tuple[str, ...] = ("jsonl",)
    wandb: WandbConfig = WandbConfig()

    def __post_init__(self):
        for kind in self.kinds:
            check_choice("tracking.kinds entry", kind, TRACKERS)


@dataclasses.dataclass(frozen=True)
class LmEvalConfig:
    """lm-evaluation-harness tasks scored on theta_0 and on every `every`-th theta_{t+1} (and the
    last) by the `lm_eval` evaluator (the `lm_eval` extra). `tasks`: lm-eval task names, found in
    lm-eval's own task folder or in `include_path` (a folder of task YAML files); `limit`,
    `num_fewshot` and `apply_chat_template` mean what lm-eval's flags of those names mean."""

    tasks: tuple[str, ...] = ()
    every: int = 1
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    include_path: Optional[str] = None
    batch_size: int = 8  # rows per scoring call (a multiple of the mesh's data x fsdp size)
    max_gen_toks: int = 256  # generation tasks: lm-eval's default token limit when a task sets none
    apply_chat_template: bool = False

    def __post_init__(self):
        positive("eval.lm_eval", self, "every", "batch_size", "max_gen_toks")
        if self.limit is not None:
            positive("eval.lm_eval", self, "limit")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.lm_eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Benchmarks run by the loop's evaluators besides `selfplay.evaluators`' own values."""

    lm_eval: LmEvalConfig = LmEvalConfig()


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. `init_from`: a Hugging Face directory, a Hugging Face hub id (read
    from the local Hugging Face cache, never downloaded) or a spacejax params checkpoint for
    theta_0 (its architecture replaces `model`'s, its dtypes and remat are kept from `model`); null
    initialises `model` at random. `init_from_revision`: the revision (a commit hash pins it; a
    branch or tag is resolved through the cache's refs) of a hub id, or the one a cache snapshot
    directory (.../snapshots/<commit>/) must be; refused for any other directory
    (`spacejax.hf.resolve_init_from`). Both are recorded in the run's config.yaml."""

    seed: int = 0
    init_from: Optional[str] = None
    init_from_revision: Optional[str] = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampler: SamplerConfig = SamplerConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    selfplay: SelfPlayConfig = SelfPlayConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    lora: LoraConfig = LoraConfig()
    eval: EvalConfig = EvalConfig()

    def __post_init__(self):
        if self.init_from_revision is not None and self.init_from is None:
            raise ConfigError("init_from_revision is set but init_from is null: set init_from to the hub id (or "
                              "cache snapshot) it is a revision of, or drop init_from_revision")
        check_prompt_format(self)
        if self.checkpoint.export_adapter and not (self.lora.enabled and self.checkpoint.export_hf):
            raise ConfigError("checkpoint.export_adapter needs lora.rank set and checkpoint.export_hf=true (an "
                              "iteration's adapter is exported against the previous iteration's export)")
        for change in self.selfplay.from_iteration:  # every scheduled value is checked at load time
            try:
                phase = with_overrides(self, [parse_scheduled(change)[1]])
            except ConfigError as error:
                raise ConfigError(f"selfplay.from_iteration entry {change!r}: {error}") from None
            if (phase.sampler.prompt_format, phase.sampler.force_prompt_format) != (
                    self.sampler.prompt_format, self.sampler.force_prompt_format):
                raise ConfigError(f"selfplay.from_iteration entry {change!r}: sampler.prompt_format and "
                                  "sampler.force_prompt_format are fixed for a run (the prompts are made once); "
                                  "set them at the top level")
        if -1 not in (self.mesh.data, self.mesh.fsdp):  # else the device count decides, at run time
            check_batch_sizes(self, self.mesh.data * self.mesh.fsdp)


def check_prompt_format(cfg: RunConfig) -> None:
    """sampler.prompt_format=spin with loss.kind=space: refused unless sampler.force_prompt_format
    (SamplerConfig says why). Every scheduled phase is a RunConfig too, so each is checked."""
    if cfg.sampler.prompt_format == "spin" and cfg.loss.kind == "space" and not cfg.sampler.force_prompt_format:
        raise ConfigError("sampler.prompt_format=spin generates under SPIN's `### Instruction:` prompt but "
                          "loss.kind=space trains under the chat template, and SPACE assumes its synthetic responses "
                          "are the opponent's samples under the training prompt: use sampler.prompt_format=chat, or "
                          "set sampler.force_prompt_format=true to run it anyway")
    if cfg.sampler.prompt_format == "spin" and cfg.data.source in KNOWN_TRUTH_SOURCES:
        raise ConfigError(f"sampler.prompt_format=spin writes text prompts, and data.source={cfg.data.source} has "
                          "none: use sampler.prompt_format=chat or a text data source")


def load(path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML file (local or gs://) and apply dotted `key=value` overrides (values parsed as YAML)."""
    path = storage.location(path)
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    data = _parse_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    _from_iteration_as_strings(data)
    return from_dict(RunConfig, data)


def _from_iteration_as_strings(data: dict) -> None:
    """YAML reads a from_iteration entry `- 2: train.learning_rate=1e-7` as the mapping
    {2: "train.learning_rate=1e-7"}: make it the string "2: train.learning_rate=1e-7"."""
    section = data.get("selfplay")
    if isinstance(section, dict) and isinstance(section.get("from_iteration"), list):
        section["from_iteration"] = [_as_string(entry) for entry in section["from_iteration"]]


def _as_string(entry):
    if isinstance(entry, dict) and len(entry) == 1:
        ((iteration, override),) = entry.items()
        return f"{iteration}: {override}"
    return entry


def at_iteration(config: RunConfig, iteration: int) -> RunConfig:
    """The config that self-play iteration `iteration` runs with: `config` with every
    `selfplay.from_iteration` change of an iteration <= `iteration` applied, in the order listed (and
    `from_iteration` emptied). Iteration -1 (the SFT warm-up) and a run without changes get `config`'s
    values."""
    changes = [override for t, override in map(parse_scheduled, config.selfplay.from_iteration) if t <= iteration]
    return with_overrides(config, changes) if changes else config


def with_overrides(config: RunConfig, overrides: typing.Sequence[str]) -> RunConfig:
    """`config` with "section.key=value" overrides applied and `selfplay.from_iteration` emptied."""
    data = to_dict(config)
    data["selfplay"]["from_iteration"] = []
    for override in overrides:
        _apply_override(data, override)
    return from_dict(RunConfig, data)


def _apply_override(data: dict, override: str) -> None:
    """Set the dotted key of "section.key=value" in plain config data (the value parsed as YAML)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    _set_dotted(data, key.strip(), _parse_yaml(text, f"override {key.strip()}"))


def _parse_yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}") from None


def _set_dotted(data: dict, key: str, value) -> None:
    *sections, last = key.split(".")
    for i, section in enumerate(sections):
        node = data.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(sections[:i + 1])} is not a section")
        data = node
    data[last] = value


def dump(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
