"""LoRA self-play: the adapter algebra against NumPy, only adapters train while the base stays
fixed, every iteration starts at PAPER.md's constant, the merge is what the next opponent scores
with, a run lowers the KL, resume after SIGKILL is bitwise, and bad settings name their key."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import checkpoint, cli, config, lora, metrics, model, train
from spacejax.config import ConfigError, LoraConfig
from spacejax.pairs import Pairs
from spacejax.selfplay.setup import setup
from spacejax.trainer import Phase

from runs import assert_params_equal, final_params, step_records

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_space.yaml")
# A step checkpoint at the last step of each 4-step iteration (the one the adapter test reads)
SMALL = ["selfplay.sft_epochs=2", "selfplay.iterations=2", "data.num_train=64", "data.num_eval=32",
         "selfplay.eval_kl_samples=200", "train.epochs=1", "train.batch_size=16", "checkpoint.every_steps=4",
         "lora.rank=4", "lora.alpha=8"]
MODEL = config.load(CONFIG).model


def test_merged_kernels_are_the_base_plus_scaled_low_rank_product_and_nothing_else_changes():
    cfg = LoraConfig(rank=3, alpha=6.0, targets=("q", "o", "down"))
    base = model.init(MODEL, jax.random.key(0))
    adapters = lora.init(MODEL, cfg, jax.random.key(1))
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # b non-zero
    merged = lora.merged(cfg, base, adapters)
    for target, (path, _) in lora.TARGETS.items():
        kernel, out = base, merged
        for key in path:
            kernel, out = kernel[key], out[key]
        if target not in cfg.targets:
            np.testing.assert_array_equal(out, kernel)
            continue
        a, b = np.asarray(adapters[target]["a"]), np.asarray(adapters[target]["b"])
        layers, rank = a.shape[0], a.shape[-1]
        for layer in range(layers):
            product = a[layer].reshape(-1, rank) @ b[layer].reshape(rank, -1)
            expected = np.asarray(kernel[layer]) + 2.0 * product.reshape(kernel.shape[1:])
            np.testing.assert_allclose(np.asarray(out[layer]), expected, rtol=1e-6, atol=1e-6)
    untouched = ["embed_tokens", "lm_head", "norm"]
    for name in untouched:
        assert_params_equal(merged[name], base[name])


def test_a_fresh_adapter_changes_no_logit():
    cfg = LoraConfig(rank=4)
    base = model.init(MODEL, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, MODEL.vocab_size)
    merged = lora.merged(cfg, base, lora.init(MODEL, cfg, jax.random.key(1)))
    np.testing.assert_array_equal(model.apply(MODEL, merged, tokens)[0], model.apply(MODEL, base, tokens)[0])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora")
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *SMALL, "checkpoint.export_hf=true",
                     "checkpoint.export_adapter=true"]) == 0
    return workdir


def test_every_lora_iteration_starts_at_the_constant_and_the_kl_goes_down(lora_run):
    events = [r for r in metrics.read(lora_run) if "event" in r]
    assert [r["iteration"] for r in events] == [-1, 0, 1]
    for record in events[1:]:
        assert record["eval/loss_start"] == pytest.approx(2 * math.log(2), abs=1e-5)  # SPACE, mu = 1
    kls = [r["eval/kl"] for r in events]
    assert kls[2] < kls[1] < kls[0]


@pytest.mark.parametrize("loss, constant", [(["loss.kind=spin"], math.log(2)),
                                            (["loss.kind=space", "loss.mu=2"], 3 * math.log(3) - 2 * math.log(2))])
def test_the_first_lora_step_has_the_losss_constant(tmp_path, loss, constant):
    overrides = SMALL + ["selfplay.sft_epochs=0", "selfplay.iterations=1", *loss]
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path), *overrides]) == 0
    (event,) = [r for r in metrics.read(tmp_path) if "event" in r]
    assert event["eval/loss_start"] == pytest.approx(constant, abs=1e-5)


def test_only_adapters_are_trained_and_saved_in_the_step_checkpoints(lora_run):
    theta_1, theta_2 = final_params(lora_run, 0), final_params(lora_run, 1)
    for name in ("embed_tokens", "lm_head", "norm"):
        assert_params_equal(theta_2[name], theta_1[name])  # not a LoRA target: bitwise unchanged
    moved = theta_2["layers"]["self_attn"]["q_proj"]["kernel"] - theta_1["layers"]["self_attn"]["q_proj"]["kernel"]
    assert float(np.abs(moved).max()) > 0
    # The train state holds the adapters and their optimizer state, not the base.
    step_dir = checkpoint.iteration_dir(lora_run, 1) / "train"
    latest = max(int(p.name) for p in step_dir.iterdir() if p.name.isdigit())
    metadata = json.loads((step_dir / str(latest) / "default" / "_METADATA").read_text())
    names = " ".join(metadata["tree_metadata"])
    assert "'lora'" not in names and "'embed_tokens'" not in names and "'q'" in names


def test_the_next_opponent_scores_with_exactly_the_merge_the_player_trained_through(tmp_path):
    """The player's log-probs at its last step (the forward through base + adapter) equal the log-probs
    the next iteration's opponent computes from the merged theta_{t+1}."""
    cfg = config.load(CONFIG, SMALL + ["selfplay.iterations=1", "selfplay.sft_epochs=0"])
    parts = setup(cfg, tmp_path)
    task = parts.task
    with jax.set_mesh(parts.mesh):
        phase = Phase(0, cfg.train, cfg.train.learning_rate, 1, parts.store.checkpoints(0))
        fitted = parts.trainer.fit(parts.theta_0, Pairs.real_only(task.train), parts.sft_objective, phase)
        pairs = Pairs.real_only(task.eval)
        sequences = pairs.sequences(pairs.length(cfg.data), task.pad_id, real_only=True)
        through_adapter = jax.jit(lambda base, adapters: train.sequence_logps(
            parts.store.model_cfg, lora.merged(cfg.lora, base, adapters), sequences["tokens"],
            sequences["loss_mask"], sequences["attention_mask"])[0])(parts.theta_0, fitted.state.params)
        merged = parts.scorer.score(fitted.params, sequences)
    np.testing.assert_allclose(merged, np.asarray(through_adapter), rtol=0, atol=1e-5)
    assert float(np.abs(merged - parts.scorer.score(parts.theta_0, sequences)).max()) > 1e-4  # it trained


def test_each_iterations_peft_adapter_on_its_base_is_the_next_iterations_model(lora_run):
    """peft loads hf/iter_t_adapter onto theta_t (hf/theta_0, then hf/iter_{t-1}) and gives the
    logits of theta_{t+1} (hf/iter_t)."""
    import peft
    import torch
    import transformers

    tokens = torch.tensor([[1, 4, 9, 10, 11, 2], [1, 5, 12, 13, 8, 9]])
    for t, base in ((0, "theta_0"), (1, "iter_000")):
        hf_dir = lora_run / "hf"
        adapter = json.loads((hf_dir / f"iter_{t:03d}_adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(hf_dir / base) and adapter["r"] == 4
        on_base = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(hf_dir / base), hf_dir / f"iter_{t:03d}_adapter")
        merged = transformers.AutoModelForCausalLM.from_pretrained(hf_dir / f"iter_{t:03d}")
        with torch.no_grad():
            np.testing.assert_allclose(on_base(tokens).logits.numpy(), merged(tokens).logits.numpy(), atol=1e-4)


def test_export_adapter_needs_lora_and_the_hf_export():
    with pytest.raises(ConfigError, match="checkpoint.export_adapter needs lora.rank"):
        config.load(CONFIG, ["checkpoint.export_adapter=true", "checkpoint.export_hf=true"])


# One iteration of 40 steps without SFT (theta_0 is the init), a save every 5: a SIGKILL lands mid-iteration
LONG = SMALL + ["selfplay.sft_epochs=0", "selfplay.iterations=1", "selfplay.eval_kl_samples=64", "train.epochs=10",
                "train.log_every=1", "checkpoint.every_steps=5"]


def test_resume_after_sigkill_mid_iteration_is_bitwise(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(reference), *LONG]) == 0
    command = [sys.executable, "-m", "spacejax.cli", "train", "--config", CONFIG, "--workdir", str(killed), *LONG]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not any(r["iteration"] == 0 and r.get("step", 0) >= 12 for r in metrics.read(killed)):
        assert process.poll() is None, process.stdout.read()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not checkpoint.is_done(checkpoint.iteration_dir(killed, 0))
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(killed), *LONG]) == 0
    assert_params_equal(final_params(killed, 0), final_params(reference, 0))
    assert step_records(killed) == step_records(reference)


@pytest.mark.parametrize("override, key", [("lora.rank=0", "lora.rank"), ("lora.targets=[q,x]", "lora.targets"),
                                           ("lora.dropout=0.1", "lora.dropout"), ("lora.rank=40", "lora.rank")])
def test_bad_lora_settings_name_their_key_and_write_nothing(tmp_path, capsys, override, key):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), override]) == 2
    error = capsys.readouterr().err
    assert key in error and "Traceback" not in error
    assert not (workdir / "config.yaml").exists()


def test_a_rank_above_a_projections_side_is_refused():
    with pytest.raises(ConfigError, match=r"lora.rank \(40\) exceeds the k projection's smaller side \(32\)"):
        lora.check_rank(MODEL, LoraConfig(rank=40))
