"""`spacejax bench throughput` end to end on a tiny model: the JSON's fields, its FLOP counts against
a count from the architecture's shapes, and the roofline arithmetic against hand-worked numbers."""

import json
from pathlib import Path

import pytest

from spacejax import bench, cli, config, model
from spacejax.bench import machine, throughput

TINY = {"model.vocab_size": 256, "model.hidden_size": 64, "model.intermediate_size": 96, "model.num_layers": 2,
        "model.num_heads": 4, "model.num_kv_heads": 2, "model.head_dim": 16, "data.max_length": 32,
        "data.max_prompt_length": 8, "sampler.max_new_tokens": 8, "train.batch_size": 2}
BATCHES = (2, 4)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput") / "throughput.json"
    code = cli.main(["bench", "throughput", "--out", str(out), "--repeats", "1", "--sampler-batches",
                     ",".join(map(str, BATCHES)), "--matmul-size", "256", "--bandwidth-bytes", str(2**22),
                     "--profile", str(out.parent / "profile"),
                     *(f"{k}={v}" for k, v in TINY.items())])
    assert code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["profile", out.name]  # no staging file left
    return json.loads(out.read_text())


def shape_count(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim) -> tuple[int, int]:
    """(all parameters, parameters entering matmuls) of an untied Llama, from its shapes."""
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    layer = attention + 3 * hidden * intermediate + 2 * hidden  # + gate, up, down; two norms
    matmul = layers * layer + hidden + hidden * vocab  # + final norm, output projection
    return matmul + vocab * hidden, matmul


def test_flops_per_token_match_the_architecture(result):
    params, matmul = shape_count(256, 64, 96, 2, 4, 2, 16)
    assert result["model"] == {"params": params, "matmul_params": matmul, "weight_bytes": 4 * matmul}
    length, prompt, new = 32, 8, 8
    assert result["train"]["flops_per_token"] == 6 * matmul + 12 * 2 * 4 * 16 * length
    assert result["score"]["flops_per_token"] == 2 * matmul + 4 * 2 * 4 * 16 * length
    for entry in result["sampler"]:
        assert entry["flops_per_token"] == 2 * matmul + 4 * 2 * 4 * 16 * (prompt + new / 2)


def test_rates_and_fractions_are_sane(result):
    for part, tokens in (("train", 2 * 2 * 32), ("score", 2 * 2 * 32)):
        figures = result[part]
        assert figures["tokens_per_call"] == tokens
        assert figures["seconds"] == min(figures["seconds_all"]) > 0
        assert figures["tokens_per_second"] == pytest.approx(tokens / figures["seconds"])
        assert 0 < figures["mfu"] < 1.5
    assert result["score_over_train"] == pytest.approx(
        result["score"]["tokens_per_second"] / result["train"]["tokens_per_second"])
    assert [s["batch"] for s in result["sampler"]] == list(BATCHES)
    for entry in result["sampler"]:
        assert entry["tokens_per_second"] == pytest.approx(entry["batch"] * 8 / entry["seconds"])
        assert 0 < entry["roofline_fraction"] < 1.5 and 0 < entry["mfu"] < 1.5
        assert entry["step_roofline_fraction"] == pytest.approx(entry["step_roofline_seconds"] / entry["step_seconds"])
        assert entry["step_roofline_seconds"] < entry["roofline_seconds"] / 8  # one of the 8 steps, no prefill
        assert entry["step_bound"] in ("memory", "compute")
    assert result["limits"]["matmul_flops_per_second"] > 1e8
    assert result["limits"]["memory_bytes_per_second"] > 1e8


def test_profiles_name_the_compiled_ops(result):
    """Every part's top ops are XLA ops of a trace; the train step's are ops of its compiled HLO."""
    for part in (result["train"], result["score"], *result["sampler"]):
        ops = part["profile"]
        assert ops and all(op["milliseconds"] >= 0 and op["calls"] >= 1 for op in ops)
        assert [op["milliseconds"] for op in ops] == sorted((op["milliseconds"] for op in ops), reverse=True)
    hlo = (Path(result["command"].split("--profile ")[1].split()[0]) / "train" / "module.hlo.txt").read_text()
    assert all(f"%{op['op']} = {op['shape']} " in hlo for op in result["train"]["profile"])
    for part in (result["train"], result["score"]):
        assert any("jit(" in op.get("source", "") for op in part["profile"])


def test_memory_and_provenance(result):
    memory = result["train"]["memory"]
    assert memory["alias"] > 0  # the state is donated: its buffers become the new state's
    assert memory["peak_bytes"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    assert memory["logits_bytes"] == 4 * 32 * 256 * 4
    assert result["max_rss_bytes"] > memory["peak_bytes"]
    assert "--out" in result["command"] and "model.hidden_size=64" in result["command"]
    assert config.from_dict(config.RunConfig, result["config"]).model.hidden_size == 64


def test_generate_roofline_by_hand():
    """Batch 4, prompt 3, 2 new tokens on a tiny Llama; every bound worked out from its shapes."""
    cfg = config.ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=12, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=4)
    params = model.param_shapes(cfg)
    _, matmul = shape_count(100, 8, 12, 1, 2, 1, 4)
    weight_bytes = 4 * matmul
    step_flops = 4 * (2 * matmul + 4 * 1 * 2 * 4 * (3 + 2 / 2))  # mean context: prompt + half the new tokens
    prefill_flops = 4 * 2 * (2 * (matmul - 100 * 8) + 4 * 1 * 2 * 4 * 3)  # P - 1 tokens, no output projection

    memory_bound = throughput.generate_roofline(cfg, params, 4, 3, 2, peak=1e12, bandwidth=1e3)
    assert memory_bound["step_bound"] == "memory"
    assert memory_bound["roofline_seconds"] == pytest.approx(3 * weight_bytes / 1e3)
    compute_bound = throughput.generate_roofline(cfg, params, 4, 3, 2, peak=1e3, bandwidth=1e12)
    assert compute_bound["step_bound"] == "compute"
    assert compute_bound["roofline_seconds"] == pytest.approx((prefill_flops + 2 * step_flops) / 1e3)
    assert compute_bound["roofline_tokens_per_second"] == pytest.approx(8 / compute_bound["roofline_seconds"])


def test_measures_are_importable_from_bench():
    assert bench.measure_matmul_peak is machine.measure_matmul_peak
    assert bench.measure_memory_bandwidth(2**20, repeats=1) > 0
