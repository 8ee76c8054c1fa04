"""Fault injection on the checkpoints spacejax writes: every one carries a manifest of its files'
sizes and checksums (spacejax.integrity), verified before it is read.

A step checkpoint overwritten in place with same-size garbage, or holding a non-finite state, is set
aside and the previous step used (the run ends bitwise equal to an uninterrupted one); a final
half-written by a crash is redone; a corrupted final of a DONE iteration stops the run naming the
file; an HF export replaces the previous one whole; the same on gs:// from the objects' metadata."""

import os
import re
import shutil
from pathlib import Path

import fsspec
import jax
import jax.numpy as jnp
import pytest

from spacejax import checkpoint, cli, hf, integrity, model, storage, train
from spacejax.config import ModelConfig, TrainConfig

from runs import assert_params_equal, final_params, step_records

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_space.yaml")
# SFT, then one iteration of 4 steps with a step checkpoint after every step, the newest 3 kept.
RUN = ["selfplay.sft_epochs=2", "selfplay.iterations=1", "data.num_train=64", "data.num_eval=32",
       "selfplay.eval_kl_samples=200", "train.epochs=1", "train.batch_size=16", "checkpoint.every_steps=1",
       "checkpoint.keep=3"]
CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
PARAMS = model.init(CFG, jax.random.key(3))


def train_cli(workdir) -> int:
    return cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *RUN])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; each test damages a copy of it."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train_cli(workdir) == 0
    return workdir


def copy_of(workdir, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def largest_file(directory) -> Path:
    return max((p for p in Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flipped(data: bytes) -> bytes:
    """`data` with 64 bytes a third of the way in inverted: same size, other content (such a change
    restores without an error from Orbax: the values read are just different)."""
    start = len(data) // 3
    return data[:start] + bytes(b ^ 0xFF for b in data[start:start + 64]) + data[start + 64:]


def flip_in_place(file: Path) -> None:
    size = file.stat().st_size
    file.write_bytes(flipped(file.read_bytes()))
    assert file.stat().st_size == size


def warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")


# ----------------------------------------------------------------------------------- the run


def test_a_step_checkpoint_overwritten_with_same_size_garbage_is_set_aside_and_the_run_ends_bitwise_equal(
        reference, tmp_path, caplog):
    workdir = copy_of(reference, tmp_path)
    phase = workdir / "iter_000"
    for name in ("DONE", "eval.json"):  # as if stopped after saving step 3: one step is left to train
        (phase / name).unlink()
    shutil.rmtree(phase / "final")
    shutil.rmtree(phase / "train" / "4")
    damaged = largest_file(phase / "train" / "3")
    flip_in_place(damaged)

    with caplog.at_level("WARNING"):
        assert train_cli(workdir) == 0
    assert str(damaged) in warnings(caplog) and "/train/3 does not restore" in warnings(caplog)
    assert (phase / "unreadable" / "3" / checkpoint.ORBAX_COMMIT_MARKER).is_file()  # set aside, not deleted
    assert_params_equal(final_params(workdir, 0), final_params(reference, 0))
    assert step_records(workdir) == step_records(reference)


@pytest.mark.parametrize("written", [(), (integrity.MANIFEST,)])
def test_final_params_without_model_config_are_redone_and_the_run_ends_bitwise_equal(reference, tmp_path, written):
    """A crash between the final's params/ and its model_config.json (before or after the manifest)."""
    workdir = copy_of(reference, tmp_path)
    phase = workdir / "iter_000"
    for name in {"DONE", "eval.json", "final/model_config.json", f"final/{integrity.MANIFEST}"} - \
            {f"final/{name}" for name in written}:
        (phase / name).unlink()
    assert (phase / "final" / checkpoint.PARAMS).is_dir()

    assert train_cli(workdir) == 0
    assert checkpoint.is_done(phase) and integrity.verify(phase / "final")
    assert_params_equal(final_params(workdir, 0), final_params(reference, 0))


def test_a_corrupted_final_of_a_done_iteration_stops_the_rerun_naming_the_file(reference, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    damaged = largest_file(workdir / "iter_000" / "final" / checkpoint.PARAMS)
    flip_in_place(damaged)
    capsys.readouterr()

    assert train_cli(workdir) == 2
    error = capsys.readouterr().err
    assert str(damaged) in error and "Traceback" not in error and len(error.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------- step checkpoints


def two_steps(directory):
    """Steps 1 and 2 of a tiny train state saved through TrainCheckpoints (async, with manifests);
    returns the state of step 1."""
    state = train.create_state(PARAMS, TrainConfig(optimizer="adamw"))
    checkpoints = checkpoint.TrainCheckpoints(directory, keep=3)
    checkpoints.save(1, state)
    later = state.replace(step=jnp.int32(2), params=jax.tree.map(lambda x: x + 1, state.params))
    checkpoints.save(2, later)
    checkpoints.close()
    return state


def nan_opt_state(directory):
    """Save step 2 again with a NaN optimizer state (its manifest matches: only the finite check can tell)."""
    state = train.create_state(PARAMS, TrainConfig(optimizer="adamw"))
    poisoned = state.replace(step=jnp.int32(2), opt_state=jax.tree.map(
        lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else x, state.opt_state))
    shutil.rmtree(directory / "train" / "2")
    checkpoints = checkpoint.TrainCheckpoints(directory, keep=3)
    checkpoints.save(2, poisoned)
    checkpoints.close()


@pytest.mark.parametrize("damage, named", [
    (nan_opt_state, "not finite"),
    (lambda directory: (directory / "train" / "2" / integrity.MANIFEST).unlink(), integrity.MANIFEST),
])
def test_a_non_finite_or_unverifiable_step_is_set_aside_for_the_previous_one(tmp_path, caplog, damage, named):
    state = two_steps(tmp_path)
    damage(tmp_path)
    with caplog.at_level("WARNING"):
        step, restored = checkpoint.TrainCheckpoints(tmp_path, keep=3).restore_latest(state)
    assert step == 1
    assert_params_equal(restored.params, PARAMS)
    assert named in warnings(caplog) and f"{tmp_path}/train/2" in warnings(caplog)
    assert (tmp_path / "unreadable" / "2").is_dir()


def test_every_committed_step_carries_a_manifest_without_orbax_commit_files(tmp_path):
    two_steps(tmp_path)
    for step in (1, 2):
        manifest = integrity.read(tmp_path / "train" / str(step))
        assert manifest["algorithm"] == integrity.CRC32 and manifest["files"]
        assert checkpoint.ORBAX_COMMIT_MARKER not in manifest["files"]  # written by the commit, after it
        assert integrity.verify(tmp_path / "train" / str(step))
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["1", "2"]  # nothing staged is left


# ----------------------------------------------------------------------------------- manifests


def checkpoint_dir(tmp_path) -> Path:
    directory = tmp_path / "ckpt"
    (directory / "sub").mkdir(parents=True)
    (directory / "data.bin").write_bytes(os.urandom(3000))
    (directory / "sub" / "small.json").write_text('{"a": 1}')
    integrity.write(directory, integrity.describe(directory))
    return directory


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "sub" / "small.json").unlink(), "sub/small.json is missing"),
    (lambda d: (d / "data.bin").write_bytes((d / "data.bin").read_bytes()[:-1]), "data.bin has 2999 bytes, not the 3000"),
    (lambda d: flip_in_place(d / "data.bin"), "data.bin has crc32"),
    (lambda d: (d / integrity.MANIFEST).write_text('{"files": 1'), "manifest.json is not a manifest spacejax reads"),
    (lambda d: (d / integrity.MANIFEST).unlink(), "manifest.json is missing"),
])
def test_verify_names_the_file_that_is_missing_resized_or_changed(tmp_path, damage, message):
    directory = checkpoint_dir(tmp_path)
    (directory / "unlisted.txt").write_text("a marker written after the manifest")  # not checked
    assert integrity.verify(directory)
    damage(directory)
    with pytest.raises(integrity.IntegrityError, match=message):
        integrity.verify(directory)


def test_a_directory_without_manifest_verifies_only_when_one_is_not_required(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert integrity.verify(tmp_path, required=False) is False
    with pytest.raises(integrity.IntegrityError, match="missing"):
        integrity.verify(tmp_path)


def test_a_manifest_naming_a_file_outside_its_directory_is_refused(tmp_path):
    directory = checkpoint_dir(tmp_path)
    integrity.write(directory, {"../escape": {"size": 1, "checksum": "00000000"}})
    with pytest.raises(integrity.IntegrityError, match="not a manifest"):
        integrity.verify(directory)


# ----------------------------------------------------------------------------------- params checkpoints


def test_a_params_checkpoint_is_verified_on_load_and_a_half_written_one_refused_or_redone(tmp_path):
    directory = tmp_path / "final"
    checkpoint.save_params(directory, CFG, PARAMS)
    assert_params_equal(checkpoint.load_params(directory)[1], PARAMS)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        checkpoint.save_params(directory, CFG, PARAMS)

    (directory / checkpoint.MODEL_CONFIG).unlink()  # a crash before the marker
    with pytest.raises(FileExistsError, match="half-written"):
        checkpoint.save_params(directory, CFG, PARAMS)
    checkpoint.save_params(directory, CFG, PARAMS, resume=True)
    assert_params_equal(checkpoint.load_params(directory)[1], PARAMS)

    damaged = largest_file(directory / checkpoint.PARAMS)
    flip_in_place(damaged)
    with pytest.raises(integrity.IntegrityError, match=re.escape(str(damaged))):
        checkpoint.load_params(directory)
    checkpoint.save_params(directory, CFG, PARAMS, resume=True)  # the store redoes a final that does not verify
    assert_params_equal(checkpoint.load_params(directory)[1], PARAMS)


# ----------------------------------------------------------------------------------- Hugging Face exports


def test_an_hf_export_replaces_the_previous_one_whole_and_is_verifiable(tmp_path):
    out = tmp_path / "hf"
    hf.save(CFG, PARAMS, out, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    (integrity.staging_folder(out) / "model.safetensors").write_bytes(b"half")  # an export killed half-way

    hf.save(CFG, PARAMS, out)  # one file now: the earlier shards and the staging folder go
    assert not list(out.glob("model-*-of-*.safetensors")) and not (out / hf.INDEX_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert set(integrity.read(out)["files"]) == {p.name for p in out.iterdir()} - {integrity.MANIFEST}
    assert integrity.verify(out)
    assert_params_equal(hf.load(out)[1], PARAMS)
    flip_in_place(out / hf.SINGLE_FILE)
    with pytest.raises(integrity.IntegrityError, match=hf.SINGLE_FILE):
        integrity.verify(out)


# ----------------------------------------------------------------------------------- gs://


def test_on_gs_garbage_in_a_step_or_a_final_is_caught_from_the_objects_checksums(gcs, caplog):
    phase = gcs("phase")
    state = two_steps(storage.location(phase))  # storage.location points gcsfs at the emulator first
    fs = fsspec.filesystem("gcs")
    manifest = integrity.read(f"{phase}/train/2")
    assert manifest["algorithm"] == integrity.CRC32C
    objects = fs.find(f"{phase}/train/2", detail=True)
    largest = max(objects, key=lambda name: objects[name]["size"])
    fs.pipe_file(largest, flipped(fs.cat_file(largest)))  # same size, rewritten in place

    with caplog.at_level("WARNING"):
        step, restored = checkpoint.TrainCheckpoints(phase, keep=3).restore_latest(state)
    assert step == 1
    assert_params_equal(restored.params, PARAMS)
    assert largest.split("/", 1)[1] in warnings(caplog)
    assert fs.exists(f"{phase}/unreadable/2/{checkpoint.ORBAX_COMMIT_MARKER}")

    final = f"{phase}/final"
    checkpoint.save_params(final, CFG, PARAMS)
    assert_params_equal(checkpoint.load_params(final)[1], PARAMS)
    objects = fs.find(f"{final}/{checkpoint.PARAMS}", detail=True)
    largest = max(objects, key=lambda name: objects[name]["size"])
    fs.pipe_file(largest, flipped(fs.cat_file(largest)))
    with pytest.raises(integrity.IntegrityError, match=re.escape(largest.split("/", 1)[1])):
        checkpoint.load_params(final)

    export = gcs("hf")  # its manifest is computed from the staged files: it equals what GCS stores
    hf.save(CFG, PARAMS, export)
    assert integrity.verify(export)


def test_a_checkpoint_copied_between_disk_and_bucket_still_verifies(gcs, tmp_path):
    """A local manifest (CRC-32) on gs:// and a gs:// one (CRC-32C) on disk: computed from the bytes."""
    checkpoint.save_params(tmp_path / "local", CFG, PARAMS)
    uploaded = gcs("uploaded")
    storage.location(uploaded)
    fs = fsspec.filesystem("gcs")
    fs.put(f"{tmp_path / 'local'}/", f"{uploaded}/", recursive=True)
    assert_params_equal(checkpoint.load_params(uploaded)[1], PARAMS)

    remote = gcs("remote")
    checkpoint.save_params(remote, CFG, PARAMS)
    fs.get(f"{remote}/", f"{tmp_path / 'downloaded'}/", recursive=True)
    assert integrity.read(tmp_path / "downloaded")["algorithm"] == integrity.CRC32C
    assert_params_equal(checkpoint.load_params(tmp_path / "downloaded")[1], PARAMS)
    flip_in_place(largest_file(tmp_path / "downloaded"))
    with pytest.raises(integrity.IntegrityError, match="crc32c"):
        integrity.verify(tmp_path / "downloaded")
