"""Every `model.attention` implementation against the reference einsum, through the model's one
forward: logits to 1e-5 and parameter gradients to 1e-4 in float32, on left-padded rows (and a
right-padded one) at a length that is not a multiple of the splash block, for each model family;
each test also checks, from the traced program, which implementation ran.

The programs are compiled without LLVM optimisation (`compiled`): they are tiny and run once, so
compiling is nearly all of their time, and the splash kernel runs in Pallas interpret mode here."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

from spacejax import attention, model, sharding
from spacejax.config import MeshConfig, ModelConfig

FAMILIES = {
    "llama": ModelConfig(architecture="llama"),
    "mistral": ModelConfig(architecture="mistral", sliding_window=5),
    "qwen2": ModelConfig(architecture="qwen2", qkv_bias=True),
}
IMPLEMENTATIONS = ("reference", "dot_product", "splash")
LENGTH = 13  # odd, and not a multiple of the splash kernel's 128-wide block
REAL = ((0, 13), (4, 13), (10, 13), (0, 6))  # each row's real slots: full, left-padded twice, right-padded


def batch(cfg: ModelConfig, length: int = LENGTH, real=REAL, seed: int = 0):
    """tokens int32 [B, length], attention_mask bool [B, length] with row b real on slots real[b]."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((len(real), length), bool)
    for row, (start, end) in enumerate(real):
        mask[row, start:end] = True
    tokens = rng.integers(3, cfg.vocab_size, size=mask.shape).astype(np.int32)
    return np.where(mask, tokens, 0), mask


def compiled(fn, *args):
    """`fn` jitted and compiled for `args` at LLVM optimisation level 0."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


@functools.cache
def random_params(cfg: ModelConfig) -> dict:
    """Params drawn in numpy, normal with std 0.05 around the initial values (ones for the norm
    scales), so the zero-initialised q/k/v biases of qwen2 matter too."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        center = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(center + 0.05 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, model.param_shapes(cfg))


def implementations_run(fn, *args) -> set:
    """Which attention implementations the program of `fn(*args)` contains (`implementations_in`)."""
    return implementations_in(jax.make_jaxpr(fn)(*args))


def implementations_in(program) -> set:
    """Which attention implementations a traced program (a ClosedJaxpr) contains: splash from its
    `pallas_call`, dot_product from equations traced inside jax.nn.dot_product_attention's own
    implementations, reference from equations traced inside spacejax.attention.reference."""
    found = set()

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.add("splash")
            for frame in eqn.source_info.traceback.frames if eqn.source_info.traceback else ():
                if frame.function_name in ("_dot_product_attention_xla", "cudnn_dot_product_attention"):
                    found.add("dot_product")
                if frame.function_name == "reference" and frame.file_name == attention.__file__:
                    found.add("reference")
            for sub in jaxprs_in_params(eqn.params):
                visit(sub)

    visit(program.jaxpr)
    return found


def gradient_and_logits(cfg: ModelConfig, tokens, mask):
    """params -> (gradients of the mean next-token cross-entropy over real tokens, logits [B, L, V])."""
    def loss(params):
        logits, _ = model.apply(cfg, params, tokens, attention_mask=mask)
        logps = jax.nn.log_softmax(logits[:, :-1])
        picked = jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]
        weight = mask[:, 1:] & mask[:, :-1]
        return -jnp.sum(picked * weight) / jnp.sum(weight), logits

    return jax.grad(loss, has_aux=True)


@functools.cache
def family_results(family: str) -> dict:
    """{implementation: (gradients, logits [B, L, V], implementations its program ran)} on the
    family's random params and `batch`: the three in one compiled program (one compile per
    family); cached, as the decode and mesh tests compare with these forwards."""
    cfg = FAMILIES[family]
    params = random_params(cfg)
    tokens, mask = batch(cfg)
    steps = {name: gradient_and_logits(dataclasses.replace(cfg, attention=name), tokens, mask) for name in IMPLEMENTATIONS}
    results = compiled(lambda p: {name: step(p) for name, step in steps.items()}, params)(params)
    return {name: (grads, np.asarray(logits), implementations_run(steps[name], params))
            for name, (grads, logits) in results.items()}


@pytest.mark.parametrize("implementation", ["dot_product", "splash"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_and_gradient_equal_reference(family, implementation):
    results = family_results(family)
    grads, logits, ran = results[implementation]
    expected_grads, expected_logits, reference_ran = results["reference"]
    assert ran == {implementation} and reference_ran == {"reference"}
    mask = batch(FAMILIES[family])[1]
    assert np.abs(logits[mask] - expected_logits[mask]).max() <= 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(expected_grads)) > 1e-2  # not vacuously small


def test_splash_over_several_blocks_with_a_window(monkeypatch):
    """Length 130 in 128-wide blocks: the local mask skips a whole block of keys, the second
    block's queries still see the first block's keys inside the window, and the padding to 256
    is cut off. Attention alone, forward and gradients of q, k, v."""
    monkeypatch.setattr(attention, "SPLASH_MAX_BLOCK", 128)
    cfg = dataclasses.replace(FAMILIES["mistral"], sliding_window=40)
    _, mask = batch(cfg, length=130, real=((0, 130), (30, 130)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # model.default_positions
    key_positions = np.where(mask, positions, -1)
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 130, heads, cfg.head_dim)).astype(np.float32)
               for heads in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads))

    def value_and_grads(name):
        c = dataclasses.replace(cfg, attention=name)

        def loss(q, k, v):
            out = attention.attend(c, q, k, v, attention.mask_for(c, positions, key_positions), key_positions)
            return jnp.sum(jnp.where(mask[:, :, None, None], out * q, 0))

        step = jax.value_and_grad(loss, argnums=(0, 1, 2))
        return compiled(step, q, k, v)(q, k, v), implementations_run(step, q, k, v)

    (value, grads), ran = value_and_grads("splash")
    (expected_value, expected_grads), _ = value_and_grads("reference")
    assert ran == {"splash"}
    assert abs(float(value) - float(expected_value)) <= 1e-5 * abs(float(expected_value))
    for got, want in zip(grads, expected_grads, strict=True):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-4


def test_splash_under_a_mesh_runs_per_shard_and_equals_reference():
    """Batch split over data and kv heads over tensor: the kernel runs in shard_map."""
    cfg = dataclasses.replace(FAMILIES["mistral"], attention="splash")
    params = random_params(FAMILIES["mistral"])
    tokens, mask = batch(cfg)
    forward = lambda p: model.apply(cfg, p, tokens, attention_mask=mask)[0]  # noqa: E731
    with jax.set_mesh(sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2))):
        logits = np.asarray(compiled(forward, params)(params))
        program = str(jax.make_jaxpr(forward)(params))
    assert "shard_map" in program and "pallas_call" in program
    expected = family_results("mistral")["reference"][1]
    assert np.abs(logits[mask] - expected[mask]).max() <= 1e-5


@pytest.mark.parametrize("backend, dtype, expected", [
    ("tpu", "float32", "splash"), ("tpu", "bfloat16", "splash"), ("gpu", "bfloat16", "dot_product"),
    ("gpu", "float32", "reference"), ("cpu", "bfloat16", "reference")])
def test_auto_picks_per_backend(backend, dtype, expected, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert attention.resolve(ModelConfig(attention="auto", dtype=dtype)) == expected
    assert attention.resolve(ModelConfig(attention="splash", dtype=dtype)) == "splash"  # an explicit setting stands


def test_prefill_then_decode_equals_the_full_forward_of_every_setting():
    """The sampler's path: rows prefilled into the cache, then one token per step, attended over
    the cache by the decode attention. Its program is the same under every setting (the reference
    einsum over the cache), so it runs once and equals each setting's full forward."""
    cfg = FAMILIES["mistral"]
    weights = model.decode_params(cfg, random_params(cfg))
    tokens, mask = batch(cfg)
    prompt = 7

    def step(cfg):
        return lambda p, t, m, c: model.apply(cfg, p, t, cache=c, attention_mask=m)

    cache = model.init_cache(cfg, len(tokens), LENGTH)
    prefill_args = (weights, tokens[:, :prompt], mask[:, :prompt], cache)
    logits, cache = compiled(step(cfg), *prefill_args)(*prefill_args)
    decode = compiled(step(cfg), weights, tokens[:, :1], mask[:, :1], cache)
    decoded = [logits]
    for i in range(prompt, LENGTH):
        logits, cache = decode(weights, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
        decoded.append(logits)
    decoded = np.concatenate(decoded, axis=1)

    programs = set()
    for setting in ("reference", "dot_product", "splash", "auto"):
        setting_cfg = dataclasses.replace(cfg, attention=setting)
        for args in (prefill_args, (weights, tokens[:, :1], mask[:, :1], cache)):
            program = jax.make_jaxpr(step(setting_cfg))(*args)
            assert implementations_in(program) == {"reference"}
            programs.add(str(program))
        expected = family_results("mistral")[attention.resolve(setting_cfg)][1]
        assert np.abs(decoded[mask] - expected[mask]).max() <= 1e-5
    assert len(programs) == 2  # one prefill program and one decode program for all four settings


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on a CUDA GPU only")
def test_cudnn_with_left_padding_matches_reference_in_bfloat16():
    """gpu_check's case: dot_product on GPU in bfloat16 is cuDNN's fused kernel (its custom call in
    the compiled program), and left-padded rows come out as the reference's."""
    cfg = dataclasses.replace(FAMILIES["mistral"], dtype="bfloat16", hidden_size=256, head_dim=64)
    params = random_params(cfg)
    tokens, mask = batch(cfg, length=64, real=((0, 64), (20, 64), (50, 64)))
    forward = lambda c: jax.jit(lambda p: model.apply(c, p, tokens, attention_mask=mask)[0])  # noqa: E731
    cudnn = forward(dataclasses.replace(cfg, attention="dot_product"))
    assert "cudnn" in cudnn.lower(params).compile().as_text().lower()
    logits = np.asarray(cudnn(params))
    expected = np.asarray(forward(dataclasses.replace(cfg, attention="reference"))(params))
    assert np.abs(logits[mask] - expected[mask]).max() <= 0.1 * np.abs(expected[mask]).max()
