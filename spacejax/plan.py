"""Memory and divisibility planner: will a config fit a device topology, and what fills each chip?

    spacejax plan --config configs/zephyr7b_space.yaml --devices 64 --hbm-gib 95

Nothing is allocated and no device is needed: parameter and optimizer-state shapes come from
`jax.eval_shape` (`model.param_shapes`), their per-device shard shapes from
`NamedSharding.shard_shape` of `sharding.param_shardings` over a `jax.sharding.AbstractMesh` of N
devices with the config's axis sizes (`sharding.mesh_sizes`: one -1 filled from N).

Phases. Training, generation and opponent scoring never run at the same time, so

    peak = params + max(train step, generation, scoring)

where the params (theta_t, or the train state's params while training) are resident in every
phase and each phase adds its own:

    train step  = optimizer state + gradients + saved activations + max(one layer's backward
                  workspace, logits/loss)
    generation  = decode layout of the layer weights + KV cache + prefill workspace
    scoring     = max(one layer's forward workspace, logits) of a forward-only pass

Activation formula (per device). r rows on the device = the phase's rows / (data x fsdp) when
divisible (else all rows: replicated), L tokens, a bytes of the compute dtype, and per layer the
units (heads, kv heads, mlp and vocab divided by `tensor` where it divides them)

    u_h = r L H a,   u_q = r L N D a,   u_kv = r L K D a,   u_f = r L F a,   u_s = r N L S 4

(u_s: float32 attention scores against S keys; S = L except in prefill). The scanned decoder
keeps, for every one of the n layers, what the backward pass needs (`saved`), and at any time
works on one layer (`workspace`):

    saved(none) = 6 u_h + 2 u_q + 2 u_kv + 6 u_f + 2 u_s   every residual of a layer: its input,
                  the norms' outputs, q/k/v after RoPE, scores and probabilities, gate, up, silu
    saved(dots) = 3 u_h + u_q + 2 u_kv + 2 u_f              the carry and the outputs of the
                  weight matmuls (q, k, v, o, gate, up, down); attention einsums are recomputed
    saved(full) = u_h                                        only the carry (the layer input)
    workspace   = saved(none) - saved(policy)                the recomputed residuals of a layer
                  (- u_s unless remat is none)               (recomputed scores fuse into the softmax)
                  + u_s + 2 u_f + 2 u_h                      gradients of scores, mlp, hidden
                  + 2 W                                      the layer's weights gathered over
                                                              fsdp, and their full gradient
    activations = n saved(policy) + workspace
    logits/loss = r L' V a                                   d logp / d logits at every position
                  + 2 r c V 4                                float32 logits and softmax of a chunk
                  + V H a + V H 4                            the output kernel whole in the
                                                              compute dtype and its float32
                                                              gradient, where they are not the
                                                              param and its gradient themselves

W is one layer's parameters in the param dtype, unsharded over fsdp. The loss never holds
[r, L, V] logits (`losses.sequence_logps_from_hidden`, also what scoring runs): it projects the
final hidden states in chunks of c = `losses.LOGIT_CHUNK_LENGTH` positions (L' = L padded to whole
chunks) and, differentiated, keeps one full-size tensor, d logp / d logits [r, L', V] in the
compute dtype, which its backward multiplies by. The coefficients are the residuals JAX's
autodiff keeps for this model's layer after XLA's fusion, read off XLA's buffer assignment;
against `compiled.memory_analysis()` on 8 CPU devices (tests/test_plan.py) the estimate / XLA
ratio of the whole step is 0.89-0.91 for remat none (XLA:CPU keeps a few more gradient
temporaries), 1.01 for full and 1.08 for dots, 1.00-1.05 where the vocabulary dominates; scoring
1.00-1.09. Forward only (scoring, prefill) keeps nothing per layer:

    forward workspace = 2 u_h + u_q + 2 u_kv + 2 u_f + u_s + W;  logits = 2 r c V 4 + V H a

Generation: the KV cache is 2 n r S K D a (+ r S 4 of key positions) with S = the prompt bucket
(the power of two >= data.max_prompt_length, as `sampler.generate` pads) - 1 + max_new_tokens,
r = sampler.batch_size rows / (data x fsdp). `sampler.generate` decodes on `model.decode_params`:
the stacked layer weights split into one array per layer, a copy of them at their per-device
size (the embedding, final norm and head are the params' own arrays).

LoRA (`lora.rank` set, spacejax.lora): the train state is the adapters', so the train step holds

    params (the base, model.param_dtype, fixed) + adapters (float32 [L, *in, r] and [L, r, *out],
    sharded like `lora.logical_axes`) + optimizer state and gradients of the adapters only
    + merged kernels + activations as above

where merged kernels = (T / L)(p + 4): one layer's share of the T elements of the target kernels,
once in the param dtype (each layer merges kernel + (alpha / r) a b as it runs: `lora.attach`,
`model.merge_low_rank`) and once as its float32 cotangent in the backward. Generation and scoring
run on the base (theta_t). Against XLA's compiled memory the LoRA estimate is 0.99 on the
throughput model (benchmarks/BENCHMARKS.md) and 1.09 on the 7B recipe on one device; on a tiny
model whose layer weights outweigh its activations it is conservative (up to ~1.6x: the
activation terms count the full step's per-layer backward workspace, which LoRA's does not fill).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from spacejax import axes, config, lora, losses, model, sharding, train
from spacejax.config import ConfigError, ModelConfig, RunConfig

GIB = 2**30
SCORE_BYTES = 4  # attention scores and logits are float32
MIN_PROMPT_BUCKET = 16  # sampler.MIN_BUCKET: prompts are left-padded to powers of two from 16


# ----------------------------------------------------------------------------------- the mesh


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes[a] for a in sharding.AXES), sharding.AXES)


def _shards(mesh, mesh_axes) -> int:
    return math.prod(mesh.shape[a] for a in mesh_axes)


def _split(size: int, shards: int) -> float:
    """Per-device share of a dimension split `shards` ways (the whole of it when not divisible)."""
    return size / shards if size % shards == 0 else size


# ----------------------------------------------------------------------------------- state


def _leaf_bytes(shape_dtype, named_sharding: NamedSharding) -> int:
    shape = named_sharding.shard_shape(shape_dtype.shape)
    return int(math.prod(shape)) * np.dtype(shape_dtype.dtype).itemsize


def state_shardings(cfg: RunConfig, mesh):
    """(abstract TrainState, its shardings), as the loop places it (train.state_shardings)."""
    shapes = model.param_shapes(cfg.model)
    state = jax.eval_shape(lambda p: train.create_state(p, cfg.train), shapes)
    return state, train.state_shardings(cfg.train, shapes, sharding.param_shardings(cfg.model, mesh),
                                        NamedSharding(mesh, PartitionSpec()))


def adapter_state_shardings(cfg: RunConfig, mesh):
    """Under LoRA, (abstract TrainState of the adapters, its shardings), as `trainer.LowRankAdapter`
    and `trainer.Trainer` place them: adapters by `lora.logical_axes`, their optimizer state alike."""
    shapes = jax.eval_shape(lambda: lora.init(cfg.model, cfg.lora, jax.random.key(0)))
    placed = sharding.tree_shardings(lora.logical_axes(cfg.model, cfg.lora), shapes, mesh)
    state = jax.eval_shape(lambda p: train.create_state(p, cfg.train), shapes)
    return state, train.state_shardings(cfg.train, shapes, placed, NamedSharding(mesh, PartitionSpec()))


def target_kernel_elements(cfg: RunConfig, mesh) -> int:
    """Per-device elements of the kernels LoRA adapts (`cfg.lora.targets`), placed like the params."""
    shapes, placed = model.param_shapes(cfg.model), sharding.param_shardings(cfg.model, mesh)
    return sum(int(math.prod(lora._get(placed, path).shard_shape(lora._get(shapes, path).shape)))
               for path, _ in (lora.TARGETS[t] for t in cfg.lora.targets))


def tree_bytes(shapes, shardings) -> int:
    return sum(jax.tree.leaves(jax.tree.map(_leaf_bytes, shapes, shardings)))


def param_bytes(model_cfg: ModelConfig, mesh) -> int:
    """Per-device bytes of the params placed by `sharding.param_shardings`."""
    return tree_bytes(model.param_shapes(model_cfg), sharding.param_shardings(model_cfg, mesh))


def replicated_dims(model_cfg: ModelConfig, mesh) -> list[str]:
    """Parameter dimensions that `sharding.param_shardings` leaves replicated although their
    logical rule splits them over more than one device: their mesh axes do not divide them."""
    found = {}
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def visit(logical, leaf, placed):
        for name, size, split in zip(tuple(logical), leaf.shape, tuple(placed.spec)):
            wanted = axes.LOGICAL_RULES.get(name) if name else None
            if wanted and split is None and _shards(mesh, wanted) > 1:
                found[name] = f"{name} ({size}) is not divisible by {' x '.join(wanted)} = {_shards(mesh, wanted)}"

    jax.tree.map(visit, model.logical_axes(model_cfg), model.param_shapes(model_cfg),
                 sharding.param_shardings(model_cfg, mesh), is_leaf=is_spec)
    return sorted(found.values())


# ----------------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class Units:
    """Per-device bytes of one layer's activation shapes (see the module doc)."""

    hidden: float  # u_h
    query: float  # u_q
    kv: float  # u_kv
    mlp: float  # u_f
    scores: float  # u_s
    layer_weights: float  # W: one layer's params, gathered over fsdp (still split over tensor)


def units(model_cfg: ModelConfig, mesh, rows: int, length: int, keys: Optional[int] = None) -> Units:
    m, tensor = model_cfg, mesh.shape["tensor"]
    a = np.dtype(m.dtype).itemsize
    p = np.dtype(m.param_dtype).itemsize
    r = _split(rows, sharding.batch_size_divisor(mesh))
    heads, kv_heads, mlp = _split(m.num_heads, tensor), _split(m.num_kv_heads, tensor), _split(m.intermediate_size, tensor)
    keys = length if keys is None else keys
    layer_params = (m.hidden_size * (heads + 2 * kv_heads) * m.head_dim + heads * m.head_dim * m.hidden_size
                    + 3 * m.hidden_size * mlp + 2 * m.hidden_size)
    return Units(hidden=r * length * m.hidden_size * a, query=r * length * heads * m.head_dim * a,
                 kv=r * length * kv_heads * m.head_dim * a, mlp=r * length * mlp * a,
                 scores=r * heads * length * keys * SCORE_BYTES, layer_weights=layer_params * p)


def saved_per_layer(u: Units, remat: str) -> float:
    if remat == "none":
        return 6 * u.hidden + 2 * u.query + 2 * u.kv + 6 * u.mlp + 2 * u.scores
    if remat == "dots":
        return 3 * u.hidden + u.query + 2 * u.kv + 2 * u.mlp
    return u.hidden


def backward_workspace(u: Units, remat: str) -> float:
    recomputed = saved_per_layer(u, "none") - saved_per_layer(u, remat)
    if remat != "none":
        recomputed -= u.scores  # recomputing, the scores fuse into the softmax: only the probabilities stay
    return recomputed + u.scores + 2 * u.mlp + 2 * u.hidden + 2 * u.layer_weights


def forward_workspace(u: Units) -> float:
    return 2 * u.hidden + u.query + 2 * u.kv + 2 * u.mlp + u.scores + u.layer_weights


def padded_length(length: int) -> int:
    """L' = L padded to whole chunks of `losses.LOGIT_CHUNK_LENGTH` positions, as the loss pads it."""
    return -(-length // losses.LOGIT_CHUNK_LENGTH) * losses.LOGIT_CHUNK_LENGTH


def logits_bytes(model_cfg: ModelConfig, mesh, rows: int, length: int, backward: bool) -> float:
    """Per-device bytes of the loss's vocabulary projection, `losses.sequence_logps_from_hidden`
    over `rows` x `length` tokens (r rows per device, V split over `tensor` where it divides):

    float32 logits and softmax of one chunk [r, c, V] (c = `losses.LOGIT_CHUNK_LENGTH`), and the
    output kernel [H, V] whole in the compute dtype (a copy unless the param already is that);
    with `backward` (the train step) also d logp / d logits [r, L', V] in the compute dtype, kept
    by the forward for the backward, and the kernel's float32 gradient [H, V] (a buffer of its
    own unless it already is the param's gradient). No [r, L, V] logits are ever held."""
    m = model_cfg
    r = _split(rows, sharding.batch_size_divisor(mesh))
    vocab = _split(m.vocab_size, mesh.shape["tensor"])
    a, p = np.dtype(m.dtype).itemsize, np.dtype(m.param_dtype).itemsize
    split = _split(m.hidden_size, mesh.shape["fsdp"]) < m.hidden_size  # the param's H is split over fsdp
    chunks = 2 * r * losses.LOGIT_CHUNK_LENGTH * vocab * SCORE_BYTES
    kernel = m.hidden_size * vocab * a if split or a != p else 0
    if not backward:
        return chunks + kernel
    kernel_grad = m.hidden_size * vocab * SCORE_BYTES if split or p != SCORE_BYTES else 0
    return r * padded_length(length) * vocab * a + chunks + kernel + kernel_grad


# ----------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Consumer:
    name: str
    bytes: float
    phase: str  # "all", "train", "generation", "scoring"
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Plan:
    devices: int
    hbm_bytes: float
    mesh: dict[str, int]
    consumers: tuple[Consumer, ...]
    phases: dict[str, float]  # per-device peak of each phase, resident params included
    notes: tuple[str, ...]  # divisibility and device-count findings

    @property
    def peak(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.peak <= self.hbm_bytes

    @property
    def largest(self) -> Consumer:
        """The largest consumer of the peak phase (the resident params included)."""
        return max((c for c in self.consumers if c.phase in ("all", self.peak_phase)), key=lambda c: c.bytes)

    def consumer(self, name: str) -> Consumer:
        return next(c for c in self.consumers if c.name == name)


def train_rows(cfg: RunConfig) -> int:
    """Rows of one micro-batch forward: B / grad_accum_steps pairs of 1 real + K synthetic."""
    return cfg.train.batch_size // cfg.train.grad_accum_steps * (1 + cfg.sampler.num_samples)


def prompt_bucket(cfg: RunConfig) -> int:
    return max(MIN_PROMPT_BUCKET, 1 << (cfg.data.max_prompt_length - 1).bit_length())


def train_step_phase(cfg: RunConfig, mesh) -> dict[str, float]:
    """Per-device bytes of the jitted train step by consumer (params included)."""
    rows, length, m = train_rows(cfg), cfg.data.max_length, cfg.model
    accumulators = 1 if cfg.train.grad_accum_steps == 1 else 2  # the gradient + the accumulator
    if cfg.lora.enabled:  # the state is the adapters'; the base is a fixed argument of the step
        state, shardings = adapter_state_shardings(cfg, mesh)
        params, trained = param_bytes(m, mesh), tree_bytes(state.params, shardings.params)
        one_layer = target_kernel_elements(cfg, mesh) / m.num_layers
        extra = {"adapters": trained, "merged kernels": one_layer * (np.dtype(m.param_dtype).itemsize + SCORE_BYTES)}
    else:
        state, shardings = state_shardings(cfg, mesh)
        params = trained = tree_bytes(state.params, shardings.params)
        extra = {}
    u = units(m, mesh, rows, length)
    saved = m.num_layers * saved_per_layer(u, m.remat)
    workspace = backward_workspace(u, m.remat)
    logits = logits_bytes(m, mesh, rows, length, backward=True)
    return {"params": params, **extra,
            "optimizer state": tree_bytes(state.opt_state, shardings.opt_state),
            "gradients": trained * accumulators,
            "activations": saved + workspace,
            "logits/loss": logits,
            "activation peak": saved + max(workspace, logits)}


def train_step_bytes(cfg: RunConfig, mesh) -> float:
    """The train step's per-device peak: params + optimizer state + gradients + saved
    activations + max(one layer's backward workspace, logits/loss); under LoRA also the adapters
    and the merged kernels (the optimizer state and gradients are the adapters')."""
    phase = train_step_phase(cfg, mesh)
    return sum(phase.get(name, 0) for name in ("params", "adapters", "merged kernels", "optimizer state",
                                               "gradients", "activation peak"))


def scoring_phase(cfg: RunConfig, mesh) -> dict[str, float]:
    """Per-device bytes of one opponent-scoring batch (forward only, sampler.batch_size rows)."""
    rows, length = cfg.sampler.batch_size, cfg.data.max_length
    u = units(cfg.model, mesh, rows, length)
    work = u.hidden + max(forward_workspace(u), logits_bytes(cfg.model, mesh, rows, length, backward=False))
    return {"params": param_bytes(cfg.model, mesh), "opponent scoring": work}


def scoring_bytes(cfg: RunConfig, mesh) -> float:
    phase = scoring_phase(cfg, mesh)
    return phase["params"] + phase["opponent scoring"]


def generation_phase(cfg: RunConfig, mesh) -> dict[str, float]:
    """Per-device bytes of generation: the resident params, the decode layout of the layer
    weights (`model.decode_params`), KV cache, prefill workspace."""
    m = cfg.model
    layers = tree_bytes(model.param_shapes(m)["layers"], sharding.param_shardings(m, mesh)["layers"])
    prompt = prompt_bucket(cfg)
    slots = prompt - 1 + cfg.sampler.max_new_tokens
    rows = cfg.sampler.batch_size
    r = _split(rows, sharding.batch_size_divisor(mesh))
    kv_heads = _split(m.num_kv_heads, mesh.shape["tensor"])
    a = np.dtype(m.dtype).itemsize
    cache = 2 * m.num_layers * r * slots * kv_heads * m.head_dim * a + r * slots * 4
    prefill = forward_workspace(units(m, mesh, rows, prompt, keys=slots))
    return {"params": param_bytes(m, mesh), "decode weights": layers, "sampler KV cache": cache, "prefill": prefill}


def make_plan(cfg: RunConfig, devices: int, hbm_gib: float) -> Plan:
    check_topology(devices, hbm_gib)
    sizes = sharding.mesh_sizes(cfg.mesh, devices)
    mesh = abstract_mesh(sizes)
    used, notes = math.prod(sizes.values()), []
    if used < devices:
        notes.append(f"the mesh uses {used} of the {devices} devices (set one axis to -1 to use all)")
    batch_shards = sharding.batch_size_divisor(mesh)
    try:
        config.check_batch_sizes(cfg, batch_shards)
    except ConfigError as error:
        notes.append(f"{error}; spacejax train refuses it (counted here as replicated rows)")
    notes += [f"{d}: replicated" for d in replicated_dims(cfg.model, mesh)]

    t = train_step_phase(cfg, mesh)
    g = generation_phase(cfg, mesh)
    s = scoring_phase(cfg, mesh)
    rows, length = train_rows(cfg), cfg.data.max_length
    slots = prompt_bucket(cfg) - 1 + cfg.sampler.max_new_tokens
    per_device = lambda n: f"{_split(n, batch_shards):g}"  # noqa: E731
    if cfg.lora.enabled:
        targets = ", ".join(cfg.lora.targets)
        trained = (
            Consumer("params", t["params"], "all", f"the base, {cfg.model.param_dtype}, fixed; resident in every phase"),
            Consumer("adapters", t["adapters"], "train", f"LoRA rank {cfg.lora.rank} on {targets}, float32"),
            Consumer("optimizer state", t["optimizer state"], "train", f"{cfg.train.optimizer}, on the adapters only"),
            Consumer("gradients", t["gradients"], "train", "of the adapters only, float32"),
            Consumer("merged kernels", t["merged kernels"], "train",
                     f"one layer's target kernels + delta ({cfg.model.param_dtype}) and their float32 gradient"))
    else:
        trained = (
            Consumer("params", t["params"], "all", f"{cfg.model.param_dtype}, resident in every phase"),
            Consumer("optimizer state", t["optimizer state"], "train", f"{cfg.train.optimizer}, sharded like params"),
            Consumer("gradients", t["gradients"], "train", cfg.model.param_dtype))
    consumers = trained + (
        Consumer("activations", t["activations"], "train",
                 f"remat {cfg.model.remat}: {cfg.model.num_layers} layers' saved + 1 layer's backward, "
                 f"{rows} rows x {length} ({per_device(rows)} per device)"),
        Consumer("logits/loss", t["logits/loss"], "train",
                 f"d logp/d logits [{rows}, {padded_length(length)}, {cfg.model.vocab_size}] {cfg.model.dtype} + "
                 f"float32 chunks of {losses.LOGIT_CHUNK_LENGTH} positions"),
        Consumer("opponent scoring", s["opponent scoring"], "scoring",
                 f"forward only, {cfg.sampler.batch_size} rows x {length} ({per_device(cfg.sampler.batch_size)} per device)"),
        Consumer("sampler decode weights", g["decode weights"], "generation",
                 "model.decode_params: the layer weights, one array per layer"),
        Consumer("sampler KV cache", g["sampler KV cache"], "generation",
                 f"{cfg.sampler.batch_size} rows x {slots} slots, {cfg.model.dtype}"),
        Consumer("sampler prefill", g["prefill"], "generation", f"one layer's forward over {prompt_bucket(cfg)} prompt tokens"),
    )
    phases = {
        "train": train_step_bytes(cfg, mesh),
        "generation": sum(g.values()),
        "scoring": s["params"] + s["opponent scoring"],
    }
    return Plan(devices=devices, hbm_bytes=hbm_gib * GIB, mesh=sizes, consumers=consumers, phases=phases,
                notes=tuple(notes))


def check_topology(devices: int, hbm_gib: float) -> None:
    """A topology to plan for: at least one device, and a finite, positive memory per device."""
    if devices < 1:
        raise ConfigError(f"--devices {devices}: the number of devices must be at least 1")
    if not (math.isfinite(hbm_gib) and hbm_gib > 0):
        raise ConfigError(f"--hbm-gib {hbm_gib:g}: the memory per device must be a positive number of GiB")


def format_plan(plan: Plan) -> str:
    gib = lambda x: f"{x / GIB:8.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a} {n}" for a, n in plan.mesh.items())
    lines = [f"mesh: {mesh} ({plan.devices} devices), HBM {plan.hbm_bytes / GIB:g} GiB per device", "",
             f"{'consumer':<24}{'per device':>12}  {'phase':<11} note"]
    lines += [f"{c.name:<24}{gib(c.bytes)}  {c.phase:<11} {c.note}" for c in plan.consumers]
    lines += ["", "phase peaks (params + what the phase adds; phases never overlap):"]
    lines += [f"  {name:<22}{gib(value)}" for name, value in plan.phases.items()]
    lines += [f"{'total (peak)':<24}{gib(plan.peak)}  {plan.peak_phase}",
              f"{'HBM':<24}{gib(plan.hbm_bytes)}"]
    lines += [f"note: {n}" for n in plan.notes]
    if plan.fits:
        lines.append(f"verdict: FITS ({(plan.hbm_bytes - plan.peak) / GIB:.2f} GiB free at the {plan.peak_phase} peak)")
    else:
        lines.append(f"verdict: DOES NOT FIT: the {plan.peak_phase} peak needs {plan.peak / GIB:.2f} GiB of "
                     f"{plan.hbm_bytes / GIB:g} GiB; largest consumer: {plan.largest.name} "
                     f"({plan.largest.bytes / GIB:.2f} GiB)")
    return "\n".join(lines)
