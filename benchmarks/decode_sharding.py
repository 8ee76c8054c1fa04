"""Decoding with fsdp-sharded weights against weights gathered once (replicated over fsdp).

On 8 simulated CPU devices (the flag is set below, before jax is imported), a small random Llama
generates greedily on meshes (data, fsdp, tensor) = (1, 8, 1) and (2, 4, 1) from params laid out as
for training (`sharding.param_shardings`: embed over fsdp), decoding either on the fsdp-sharded
weights (XLA then all-gathers some weights and all-reduces activations at every step) or with
`generate(..., gather_weights=True)` (one all-gather before decoding; every step reads local
weights). Both alternate in one run after a warm-up; each figure is the best of the repeats
(tokens/s of the whole call, the gather included).

    python benchmarks/decode_sharding.py [--repeats 3] [--write]

`--write` replaces this benchmark's section of benchmarks/BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from spacejax import model, sampler, sharding  # noqa: E402
from spacejax.config import MeshConfig, ModelConfig  # noqa: E402

import report  # noqa: E402  # benchmarks/report.py: the BENCHMARKS.md sections

SMALL = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                    num_kv_heads=4, head_dim=64)
MESHES = ((1, 8, 1), (2, 4, 1))
BEGIN, END = report.markers("decode_sharding")


def placed_params(mesh) -> dict:
    """SMALL's random params on `mesh`, sharded as training shards them."""
    shardings = sharding.param_shardings(SMALL, mesh)
    return jax.jit(lambda: model.init(SMALL, jax.random.key(0)), out_shardings=shardings)()


def tokens_per_second(mesh, params, prompts, new_tokens: int, gather_weights: bool) -> float:
    """One greedy generate call of the prompts [B, P] -> generated tokens / wall seconds."""
    start = time.perf_counter()
    out = sampler.generate(SMALL, params, list(prompts), 0, sampler.Greedy(), max_new_tokens=new_tokens,
                           end_ids=(), batch_size=len(prompts), mesh=mesh, gather_weights=gather_weights,
                           progress=False)
    return out.tokens.size / (time.perf_counter() - start)


def run(batch: int, prompt_length: int, new_tokens: int, repeats: int) -> list[dict]:
    prompts = np.random.default_rng(0).integers(3, SMALL.vocab_size, size=(batch, prompt_length))
    results = []
    for sizes in MESHES:
        mesh = sharding.make_mesh(MeshConfig(*sizes))
        params = placed_params(mesh)
        layouts = {"fsdp": False, "gathered": True}  # name -> gather_weights
        rates = {layout: [] for layout in layouts}
        for gather in layouts.values():  # warm-up: compiles
            tokens_per_second(mesh, params, prompts, new_tokens, gather)
        for _ in range(repeats):
            for layout, gather in layouts.items():
                rates[layout].append(tokens_per_second(mesh, params, prompts, new_tokens, gather))
        result = dict(mesh=sizes, **{layout: max(r) for layout, r in rates.items()})
        result["speedup"] = result["gathered"] / result["fsdp"]
        print(f"mesh {sizes}: fsdp weights {result['fsdp']:.0f} tokens/s, gathered once {result['gathered']:.0f} "
              f"tokens/s, gathered / fsdp {result['speedup']:.2f}x", flush=True)
        results.append(result)
    return results


def markdown(results, command: str, batch: int, prompt_length: int, new_tokens: int) -> str:
    lines = [BEGIN, "## Decoding: fsdp-sharded weights vs gathered once (8 simulated CPU devices)", "",
             f"Random float32 Llama ({model.num_params(model.param_shapes(SMALL)) / 1e6:.1f}M "
             f"parameters: hidden {SMALL.hidden_size}, {SMALL.num_layers} layers, vocabulary {SMALL.vocab_size}); "
             f"batch {batch}, prompts of {prompt_length}, {new_tokens} new tokens, greedy; best of alternating runs.",
             "", "| mesh (data, fsdp, tensor) | fsdp weights tokens/s | gathered once tokens/s | gathered / fsdp |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['mesh']} | {r['fsdp']:.0f} | {r['gathered']:.0f} | {r['speedup']:.2f}x |" for r in results]
    lines += [
        "", "What the compiled decode loop does (`sampler.decode(...).lower(...).compile().as_text()`, mesh (1, 8, 1)): "
        "with fsdp weights, every step all-gathers the fused q/k/v kernels and the [vocab, hidden] output "
        "projection and all-reduces activations (11 all-gathers, 14 all-reduces in the loop); gathered once, the "
        "loop holds no collective but the loop-exit all-reduce. Here the 8 simulated devices share 2 cores and "
        "one memory: a gather is a memcpy, and 8 replicas each streaming the whole weights for their rows read "
        "8x the bytes through the same memory bus, so the two costs nearly cancel: three runs on this shared "
        "machine (1-minute load average 2.5 to 7.4) gave gathered / fsdp from 0.75x to 1.19x on both meshes, "
        "no winner beyond the noise. The default is the one that costs no memory: decode on the weights as "
        "they are (`gather_weights=False`). On a TPU each chip streams its own HBM (~1-3 TB/s) and a per-step gather "
        "crosses ICI (~0.1 TB/s per link): for a 7B model the per-step gathers (q/k/v of every layer plus the "
        "output projection, GBs) would take longer than reading the full weights from local HBM, so "
        "`gather_weights=True` should win there when `weights / tensor` fits beside the training state; "
        "measure it on the pod before relying on it.",
        "", f"Command: `{command}`", END]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.batch, args.prompt_length, args.new_tokens, args.repeats)
    if args.write:
        command = report.command_line(__file__, argv)
        report.write_section("decode_sharding", markdown(results, command, args.batch, args.prompt_length, args.new_tokens))


if __name__ == "__main__":
    main()
