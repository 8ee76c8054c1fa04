"""GPU check (issue 20): a ~1B Llama in bfloat16 on one CUDA GPU, against that GPU's limits.

benchmarks/gpu_check.sh runs this after installing jax for CUDA and running the parity and
attention tests on the GPU (their pytest summary comes in as `--tests`):

    bash benchmarks/gpu_check.sh             # a CUDA machine: the GPU section of benchmarks/BENCHMARKS.md
    bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny sizes, the section written to a temporary file
    python benchmarks/gpu_check.py [--dry-run] [--out FILE] [--tests SUMMARY] [--repeats 5]

The model: configs/throughput.yaml with TinyLlama-1.1B's shapes (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 kv heads, vocabulary 32000), random weights initialised here (nothing is
downloaded). Every figure is the best of `--repeats` calls after a warm-up call (compilation
excluded; `machine.timed_calls`).

    train    the SPIN step exactly as self-play runs it (`throughput.train_part`: RMSprop, clipping,
             the state donated) on PAIRS pairs of LENGTH tokens, float32 params and bfloat16
             compute, once with model.attention=dot_product (cuDNN's fused kernel on GPU) and once
             with reference (the einsum, float32 scores [B, heads, L, L]). MFU = tokens/s x
             `throughput.train_flops_per_token` / peak, for two peaks: the GPU's dense bfloat16
             peak from its datasheet (DATASHEETS; n/a for a GPU not in the table) and the peak of a
             bfloat16 matmul measured here (`machine.measure_matmul_peak`).
    decode   greedy `sampler.generate` (its public API, whatever batching it does) of NEW tokens
             after random prompts of PROMPT tokens, DECODE_BATCH rows, no end id, bfloat16 weights.
             tokens/s = generated tokens / wall time of the whole call (prefill included). Its
             HBM roofline: every decode step reads each matmul weight (`throughput.weight_bytes`)
             and the KV cache up to the mean context PROMPT + NEW / 2 at least once, so the NEW
             steps take at least NEW x those bytes / HBM bandwidth (datasheet, and measured:
             `machine.measure_memory_bandwidth`). The prefill is left out of the bound, so the
             fraction is conservative.
    padding  the forward's logits on left-padded rows (and one right-padded row) with dot_product
             against reference, both bfloat16: the largest difference over real tokens relative to
             the largest logit (tests/test_attention.py's cuDNN test allows 0.1), and whether
             cuDNN's kernel is in the compiled program (cuDNN's sequence lengths assume right
             padding; spacejax.attention rotates each row so that left padding comes out right).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from spacejax import config, model, sampler
from spacejax.bench import machine, throughput

import report  # benchmarks/report.py: the BENCHMARKS.md sections

SECTION = "gpu_check"
# Dense (no sparsity) bfloat16 tensor-core FLOP/s and HBM bytes/s from NVIDIA's datasheets, by a
# substring of jax's device_kind; the first match counts, so a more specific name comes first.
DATASHEETS = (
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-40GB", 312e12, 1.555e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("L40S", 362e12, 0.864e12),
    ("L4", 121e12, 0.3e12),
)
ONE_B = ["model.vocab_size=32000", "model.hidden_size=2048", "model.intermediate_size=5632", "model.num_layers=22",
         "model.num_heads=32", "model.num_kv_heads=4", "model.head_dim=64"]
TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=172", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The shapes of one check: the model overrides of configs/throughput.yaml, the train step's
    pairs and length, the decode batch, prompt and new tokens, the padding check's length, and
    the sizes of the measured matmul and reduction."""

    model: list
    pairs: int
    length: int
    prompt: int
    decode_batch: int
    new_tokens: int
    padding_length: int
    matmul: int
    bandwidth_bytes: int


GPU = Sizes(ONE_B, pairs=4, length=1024, prompt=128, decode_batch=64, new_tokens=256, padding_length=1024,
            matmul=8192, bandwidth_bytes=4 * 2**30)
DRY_RUN = Sizes(TINY, pairs=2, length=64, prompt=16, decode_batch=4, new_tokens=8, padding_length=40,
                matmul=256, bandwidth_bytes=2**24)


def datasheet(device_kind: str) -> tuple[Optional[float], Optional[float]]:
    """(dense bfloat16 FLOP/s, HBM bytes/s) of the GPU jax calls `device_kind`; (None, None) if unknown."""
    for name, peak, bandwidth in DATASHEETS:
        if name.lower() in device_kind.lower():
            return peak, bandwidth
    return None, None


def run_config(sizes: Sizes, attention: str, param_dtype: str = "float32") -> config.RunConfig:
    """configs/throughput.yaml at `sizes`, bfloat16 compute, `attention`, params in `param_dtype`."""
    return config.load(throughput.DEFAULT_CONFIG, [
        *sizes.model, "model.dtype=bfloat16", f"model.param_dtype={param_dtype}", f"model.attention={attention}",
        f"data.max_length={sizes.length}", f"data.max_prompt_length={sizes.prompt}", f"train.batch_size={sizes.pairs}"])


def uses_cudnn(hlo_text: str) -> bool:
    """Whether a compiled program calls cuDNN's fused attention (its custom call names cudnn)."""
    return "cudnn" in hlo_text.lower()


def is_out_of_memory(error: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


# ----------------------------------------------------------------------------------- figures


def train_batch(sizes: Sizes, params: dict) -> dict:
    """The train step's pair batch (`throughput.pair_batch`) on the device, with the opponent's
    log-probs (here: the same params, scored once by `throughput.score_part`)."""
    run_cfg = run_config(sizes, "auto")
    batch = throughput.pair_batch(run_cfg, np.random.default_rng(0))
    logps, _ = throughput.score_part(run_cfg, params, jax.device_put(throughput.score_rows(batch))).call()
    return jax.device_put(throughput.with_opponent(batch, logps))


def train_figures(sizes: Sizes, params: dict, batch: dict, attention: str, repeats: int) -> dict:
    """The SPIN train step with `attention` on `batch`: tokens/s, FLOPs per token, whether cuDNN
    ran, the best and all seconds; {"error": ...} when it does not fit in memory."""
    try:
        part = throughput.train_part(run_config(sizes, attention), params, batch)
        seconds = machine.timed_calls(part.call, repeats)
        cudnn = uses_cudnn(part.hlo())
    except Exception as error:  # noqa: BLE001: only out-of-memory is a figure, anything else is raised
        if not is_out_of_memory(error):
            raise
        return {"attention": attention, "error": "out of memory"}
    # the step's state (inside `part`) is freed on return, before the next variant allocates its own
    return {"attention": attention, "tokens": part.tokens, "flops_per_token": part.flops_per_token,
            "tokens_per_second": part.tokens / min(seconds), "seconds": min(seconds), "seconds_all": seconds,
            "cudnn": cudnn}


def decode_bytes_per_step(cfg: config.ModelConfig, params: dict, batch: int, context: float) -> float:
    """Bytes a decode step reads at least: the matmul weights, and keys and values of `context`
    slots of every row and layer in the cache's (compute) dtype."""
    cache = 2 * cfg.num_layers * batch * cfg.num_kv_heads * cfg.head_dim * context * jnp.dtype(cfg.dtype).itemsize
    return throughput.weight_bytes(cfg, params) + cache


def decode_figures(sizes: Sizes, params: dict, repeats: int) -> dict:
    """Greedy generation with bfloat16 weights: tokens/s of the whole call and the bytes of a step."""
    cfg = run_config(sizes, "auto", param_dtype="bfloat16").model
    weights = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), params)
    prompts = np.random.default_rng(1).integers(3, cfg.vocab_size, (sizes.decode_batch, sizes.prompt), dtype=np.int32)
    call = lambda: sampler.generate(cfg, weights, list(prompts), 0, sampler.Greedy(),  # noqa: E731
                                    max_new_tokens=sizes.new_tokens, end_ids=(), batch_size=sizes.decode_batch,
                                    progress=False).tokens
    seconds = machine.timed_calls(call, repeats)
    step_bytes = decode_bytes_per_step(cfg, weights, sizes.decode_batch, sizes.prompt + sizes.new_tokens / 2)
    return {"tokens": sizes.decode_batch * sizes.new_tokens, "seconds": min(seconds), "seconds_all": seconds,
            "tokens_per_second": sizes.decode_batch * sizes.new_tokens / min(seconds), "step_bytes": step_bytes}


def padded_rows(length: int, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [4, length] and attention_mask bool: one full row, two left-padded (a third and
    seven eighths of the slots padding), one right-padded (half)."""
    real = ((0, length), (length // 3, length), (length - length // 8, length), (0, length // 2))
    mask = np.zeros((len(real), length), bool)
    for row, (start, end) in enumerate(real):
        mask[row, start:end] = True
    tokens = np.random.default_rng(2).integers(3, vocab_size, mask.shape).astype(np.int32)
    return np.where(mask, tokens, 0), mask


def padding_figures(sizes: Sizes, params: dict) -> dict:
    """dot_product against reference on padded rows, bfloat16: the largest difference over real
    tokens relative to the largest reference logit, and whether cuDNN's kernel ran."""
    padded = dataclasses.replace(sizes, length=sizes.padding_length, prompt=sizes.padding_length // 2)
    tokens, mask = padded_rows(sizes.padding_length, run_config(padded, "auto").model.vocab_size)
    logits, cudnn = {}, False
    for attention in ("dot_product", "reference"):
        cfg = run_config(padded, attention).model
        forward = jax.jit(lambda p, c=cfg: model.apply(c, p, tokens, attention_mask=mask)[0])
        compiled = forward.lower(params).compile()
        cudnn = cudnn or (attention == "dot_product" and uses_cudnn(compiled.as_text()))
        logits[attention] = np.asarray(compiled(params), np.float32)[mask]
    difference = np.abs(logits["dot_product"] - logits["reference"]).max()
    return {"relative_difference": float(difference / np.abs(logits["reference"]).max()), "cudnn": cudnn,
            "rows": len(tokens), "length": sizes.padding_length}


def run(sizes: Sizes, repeats: int) -> dict:
    """Every figure of the module doc, with the machine's datasheet and measured limits."""
    device = jax.devices()[0]
    peak, bandwidth = datasheet(device.device_kind)
    started = time.perf_counter()
    limits = {"matmul_peak": machine.measure_matmul_peak(sizes.matmul, jnp.bfloat16),
              "bandwidth": machine.measure_memory_bandwidth(sizes.bandwidth_bytes)}
    print(f"{device.device_kind}: datasheet peak {peak}, HBM {bandwidth}; measured bf16 matmul "
          f"{scaled(limits['matmul_peak'], 'FLOP/s')}, bandwidth {scaled(limits['bandwidth'], 'B/s')}", flush=True)
    train_cfg = run_config(sizes, "auto")
    params = jax.jit(lambda key: model.init(train_cfg.model, key))(jax.random.key(0))
    result = {"device": device.device_kind, "platform": jax.default_backend(), "datasheet_peak": peak,
              "datasheet_bandwidth": bandwidth, **limits, "params": model.num_params(params),
              "matmul_params": throughput.matmul_params(train_cfg.model, params), "sizes": sizes}
    batch = train_batch(sizes, params)
    result["train"] = [train_figures(sizes, params, batch, attention, repeats)
                       for attention in ("dot_product", "reference")]
    del batch
    print(f"train: {result['train']}", flush=True)
    result["decode"] = decode_figures(sizes, params, repeats)
    print(f"decode: {result['decode']}", flush=True)
    result["padding"] = padding_figures(sizes, params)
    print(f"padding: {result['padding']}", flush=True)
    result["seconds"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------- the section


def scaled(value: float, unit: str) -> str:
    """`value` with the largest SI prefix (T, G, M, k) that leaves it at least 1: 0.99e12 -> 990.0 G."""
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def fraction(value: float, bound: Optional[float]) -> str:
    return "n/a" if bound is None else f"{value / bound:.1%}"


def train_row(entry: dict, result: dict) -> str:
    name = {"dot_product": "dot_product (cuDNN)" if entry.get("cudnn") else "dot_product (XLA, no cuDNN)",
            "reference": "reference (einsum)"}[entry["attention"]]
    if "error" in entry:
        return f"| train step, {name} | {entry['error']} | | | |"
    flops = entry["tokens_per_second"] * entry["flops_per_token"]
    return (f"| train step, {name} | {entry['tokens_per_second']:,.0f} tokens/s ({entry['seconds'] * 1e3:.1f} ms) "
            f"| {scaled(flops, 'FLOP/s')} | MFU {fraction(flops, result['datasheet_peak'])} of the datasheet peak "
            f"| MFU {fraction(flops, result['matmul_peak'])} of the measured matmul peak |")


def decode_row(result: dict) -> str:
    decode, new_tokens = result["decode"], result["sizes"].new_tokens

    def roofline(bandwidth):  # tokens/s if every step took its bytes / bandwidth
        return None if bandwidth is None else decode["tokens"] / (new_tokens * decode["step_bytes"] / bandwidth)

    bounds = {name: roofline(result[key]) for name, key in (("datasheet", "datasheet_bandwidth"),
                                                             ("measured", "bandwidth"))}
    shown = {name: "n/a" if bound is None else f"{bound:,.0f}" for name, bound in bounds.items()}
    return (f"| decode, batch {result['sizes'].decode_batch} | {decode['tokens_per_second']:,.0f} tokens/s "
            f"({decode['seconds']:.3f} s a call) | {scaled(decode['step_bytes'], 'B')} a step | HBM roofline "
            f"{shown['datasheet']} tokens/s (datasheet): {fraction(decode['tokens_per_second'], bounds['datasheet'])} "
            f"| {shown['measured']} tokens/s (measured bandwidth): "
            f"{fraction(decode['tokens_per_second'], bounds['measured'])} |")


def section_paragraphs(result: dict, command: str, tests: str) -> list[str]:
    """The section's paragraphs: what ran, the machine and its limits, the figures' table, the tests."""
    sizes, padding = result["sizes"], result["padding"]
    trained = [t for t in result["train"] if "error" not in t]
    ratio = (f"{trained[0]['tokens_per_second'] / trained[1]['tokens_per_second']:.2f}x" if len(trained) == 2
             else "n/a (a variant did not fit)")
    peak = "n/a (not in gpu_check.py's table)" if result["datasheet_peak"] is None else \
        f"{result['datasheet_peak'] / 1e12:.0f} TFLOP/s"
    hbm = "n/a" if result["datasheet_bandwidth"] is None else f"{result['datasheet_bandwidth'] / 1e12:.2f} TB/s"
    return [
        f"Random Llama of {result['params'] / 1e6:,.1f}M parameters ({' '.join(s.split('.')[1] for s in sizes.model)}; "
        f"N = {result['matmul_params'] / 1e6:,.1f}M outside the embedding lookup), bfloat16 compute. Train step: SPIN "
        f"on {sizes.pairs} pairs of {sizes.length} tokens, float32 params, RMSprop, as self-play runs it. Decode: "
        f"greedy `sampler.generate` of {sizes.new_tokens} tokens after prompts of {sizes.prompt}, bfloat16 weights, "
        "no end id, prefill included in the time (not in the roofline). Best of the repeats after a warm-up; "
        "benchmarks/gpu_check.py's docstring defines every figure.",
        f"Machine: {result['device']} ({result['platform']}), jax {jax.__version__}, host {platform.machine()} "
        f"{os.cpu_count()} cores. Datasheet: dense bfloat16 peak {peak}, HBM {hbm}. Measured here "
        f"(spacejax.bench.machine): bfloat16 {sizes.matmul}^3 matmul {scaled(result['matmul_peak'], 'FLOP/s')}, "
        f"float32 sum over {sizes.bandwidth_bytes / 2**20:g} MiB {scaled(result['bandwidth'], 'B/s')}.",
        "\n".join(["| figure | measured | work | against the datasheet | against the measured limit |",
                   "|---|---:|---:|---:|---:|",
                   *(train_row(entry, result) for entry in result["train"]),
                   f"| attention: dot_product / reference train step | {ratio} | | | |",
                   decode_row(result),
                   f"| left padding: dot_product vs reference logits, {padding['rows']} rows x {padding['length']} "
                   f"| max difference {padding['relative_difference']:.4f} of the largest logit (bound 0.1) "
                   f"| cuDNN kernel in the program: {'yes' if padding['cudnn'] else 'no'} | | |"]),
        f"Tests on this machine before the figures: {tests}",
        f"The whole measurement took {result['seconds']:.0f} s. Command: `{command}`",
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (for the CPU)")
    parser.add_argument("--out", help=f"the markdown file whose {SECTION} section is written (default: "
                                      f"{report.BENCHMARKS_MD})")
    parser.add_argument("--tests", default="not run", help="the pytest summary of the GPU tests")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--command", default="bash benchmarks/gpu_check.sh", help="the command shown in the section")
    args = parser.parse_args(argv)
    result = run(DRY_RUN if args.dry_run else GPU, args.repeats)
    if args.out is not None:
        report.BENCHMARKS_MD = Path(args.out)  # write_section writes the file this names
    title = f"GPU check: ~1B Llama in bfloat16 ({result['device']}{', dry run at tiny sizes' if args.dry_run else ''})"
    report.write_titled_section(SECTION, title, *section_paragraphs(result, args.command, args.tests))


if __name__ == "__main__":
    main()
