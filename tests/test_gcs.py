"""gs:// end to end against a real GCS emulator on loopback (the `gcs` fixture of conftest): a run
with a gs:// workdir equals the same run on local disk, a SIGKILL mid-iteration resumes to it
bitwise, a corrupted step checkpoint is set aside, convert / generate / init_from / data files
read and write gs:// directly, the metrics log is segment objects, and a bad URL or missing
credentials is refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest

from spacejax import checkpoint, cli, config, hf, metrics, sharding, sources, storage
from spacejax.pairs import Pairs
from spacejax.selfplay.setup import initial_params

from hf_models import save as save_hf_model
from runs import assert_params_equal, final_params, step_records

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_space.yaml")
# SFT (4 steps), one iteration of 40 steps with a save every 10 (a SIGKILL lands mid-iteration), an HF export.
RUN = ["selfplay.sft_epochs=1", "selfplay.iterations=1", "data.num_train=64", "data.num_eval=32",
       "selfplay.eval_kl_samples=64", "train.epochs=10", "train.batch_size=16", "train.log_every=1",
       "checkpoint.every_steps=10", "checkpoint.keep=2", "checkpoint.export_hf=true"]


def gcsfs():
    return fsspec.filesystem("gcs")


TENSORBOARD = "tracking.kinds=[jsonl,tensorboard]"  # the gs:// run writes its events to gs:// too


def train(workdir, *extra) -> int:
    return cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), *RUN, *extra])


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local")
    assert train(workdir) == 0
    return workdir


@pytest.fixture(scope="module")
def gs_run(gcs, local_run):
    workdir = gcs("run")
    assert train(workdir, TENSORBOARD) == 0
    return workdir


def test_a_run_on_gs_equals_the_same_run_on_local_disk(gs_run, local_run):
    assert not Path("gs:").exists()  # nothing went through pathlib
    assert checkpoint.is_done(checkpoint.iteration_dir(gs_run, 0))
    assert_params_equal(final_params(gs_run, 0), final_params(local_run, 0))
    assert step_records(gs_run) == step_records(local_run)
    events = [r for r in metrics.read(gs_run) if "event" in r]
    assert events == [r for r in metrics.read(local_run) if "event" in r]
    # The log is segment objects, none of them appended to; the run directory is as on disk.
    objects = {name.split("/", 3)[3] for name in gcsfs().find(gs_run)}  # bucket/unique/run/NAME
    assert "metrics.jsonl" not in objects and any(name.startswith("metrics/0000") for name in objects)
    for name in ("config.yaml", "iter_000/DONE", "iter_000/eval.json", "iter_000/samples.parquet",
                 "iter_000/final/model_config.json", "sft/DONE", "hf/iter_000/config.json"):
        assert name in objects, name
    assert any(name.startswith("events/events.out.tfevents.") for name in objects)
    assert any(name.startswith("provenance/") for name in objects)
    assert json.loads((storage.location(gs_run) / "iter_000" / "eval.json").read_text()) == \
        json.loads((local_run / "iter_000" / "eval.json").read_text())
    on_gs = Pairs.load(f"{gs_run}/iter_000/samples.parquet")
    on_disk = Pairs.load(local_run / "iter_000" / "samples.parquet")
    np.testing.assert_array_equal(on_gs.opponent_real_logps, on_disk.opponent_real_logps)
    # The Hugging Face export on gs:// loads as the one on disk.
    assert_params_equal(hf.load(f"{gs_run}/hf/iter_000")[1], hf.load(local_run / "hf" / "iter_000")[1])


def test_a_sigkill_mid_iteration_on_gs_resumes_to_the_local_result(gcs, local_run):
    workdir = gcs("killed")
    command = [sys.executable, "-m", "spacejax.cli", "train", "--config", CONFIG, "--workdir", workdir, *RUN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    commits = f"{workdir}/iter_000/train/*/{checkpoint.ORBAX_COMMIT_MARKER}"
    deadline = time.time() + 300
    while not any(int(name.split("/")[-2]) >= 10 for name in gcsfs().glob(commits)):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, "iteration 0 never saved step 10"
        gcsfs().invalidate_cache()
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not checkpoint.is_done(checkpoint.iteration_dir(workdir, 0))

    assert train(workdir) == 0
    assert_params_equal(final_params(workdir, 0), final_params(local_run, 0))
    assert step_records(workdir) == step_records(local_run)


def test_generate_convert_init_from_and_data_files_work_on_gs(gcs, tmp_path, capsys):
    local_hf = tmp_path / "hf"
    save_hf_model("llama3", local_hf)
    remote_hf = gcs("hf")
    gcsfs().put(str(local_hf) + "/", remote_hf + "/", recursive=True)
    remote_ckpt, back = gcs("ckpt"), gcs("back")
    assert cli.main(["convert", "--from-hf", remote_hf, "--out", remote_ckpt]) == 0
    assert cli.main(["convert", "--to-hf", remote_ckpt, "--out", back]) == 0
    assert_params_equal(hf.load(back)[1], hf.load(local_hf)[1])

    rows = [{"prompt_ids": [5, 6, 7]}, {"prompt_ids": list(range(3, 20))}]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "prompts.jsonl").write_text(lines)
    remote_prompts = gcs("prompts.jsonl")
    storage.write_atomic(storage.location(remote_prompts), lines)
    flags = ["--max-new-tokens", "6", "--seed", "1", "--num-samples", "2"]
    remote_out = gcs("out/completions.jsonl")
    assert cli.main(["generate", "--model", back, "--prompts", remote_prompts, "--out", remote_out, *flags]) == 0
    assert cli.main(["generate", "--model", str(local_hf), "--prompts", str(tmp_path / "prompts.jsonl"),
                     "--out", str(tmp_path / "out.jsonl"), *flags]) == 0
    assert storage.location(remote_out).read_text() == (tmp_path / "out.jsonl").read_text()
    assert sources.read_rows(remote_prompts) == rows

    # init_from a params checkpoint and a Hugging Face directory, both on gs://.
    mesh = sharding.make_mesh(config.MeshConfig())
    for start in (remote_ckpt, remote_hf):
        run_cfg = config.load(CONFIG, [f"init_from={start}"])
        with jax.set_mesh(mesh):
            _, params = initial_params(run_cfg, mesh)
        assert_params_equal(params, hf.load(local_hf)[1])


def test_a_corrupted_step_checkpoint_on_gs_is_set_aside_and_the_previous_one_used(gs_run, local_run, caplog):
    phase = f"{gs_run}/iter_000"
    for name in ("DONE", "eval.json"):
        gcsfs().rm(f"{phase}/{name}")
    gcsfs().rm(f"{phase}/final", recursive=True)
    steps = sorted(int(name.rsplit("/", 1)[1]) for name in gcsfs().ls(f"{phase}/train") if name[-1].isdigit())
    assert steps == [30, 40]
    for name in gcsfs().find(f"{phase}/train/40"):
        data = gcsfs().cat_file(name)
        if len(data) > 64:
            gcsfs().pipe_file(name, data[: len(data) // 2])

    with caplog.at_level("WARNING"):
        assert train(gs_run, TENSORBOARD) == 0
    assert any("does not restore" in r.message and "/40" in r.message for r in caplog.records)
    assert gcsfs().exists(f"{phase}/unreadable/40/{checkpoint.ORBAX_COMMIT_MARKER}")  # set aside, not deleted
    assert_params_equal(final_params(gs_run, 0), final_params(local_run, 0))


def test_metrics_segments_are_read_in_order_and_rewound_on_resume(gcs):
    workdir = gcs("log")
    writer = metrics.MetricsWriter(workdir)
    for iteration in (0, 1):
        for step in (1, 2, 3):
            writer.write({"iteration": iteration, "step": step, "loss": float(step)})
            writer.flush()  # a segment per record: the rewind crosses segment boundaries
    writer.drop_after(1, 1)
    assert [(r["iteration"], r["step"]) for r in metrics.read(workdir)] == [(0, 1), (0, 2), (0, 3), (1, 1)]
    writer.write({"iteration": 1, "step": 2, "loss": 0.5})
    writer.write({"iteration": 1, "step": 3, "loss": 0.25})
    assert len(metrics.read(workdir)) == 4  # buffered until the next flush
    writer.flush()
    assert [(r["iteration"], r["step"], r["loss"]) for r in metrics.read(workdir)][-3:] == \
        [(1, 1, 1.0), (1, 2, 0.5), (1, 3, 0.25)]


@pytest.mark.parametrize("url, message", [
    ("gs:///runs/x", "needs a bucket"),
    ("gs://no-such-bucket-here/runs/x", "bucket gs://no-such-bucket-here does not exist"),
])
def test_a_bad_gs_url_is_refused_before_anything_is_written(gcs, url, message, capsys):
    assert cli.main(["train", "--config", CONFIG, "--workdir", url]) == 2
    error = capsys.readouterr().err
    assert message in error and url in error and "Traceback" not in error
    assert not Path("gs:").exists()


def test_missing_credentials_are_refused_naming_the_url(gcs, monkeypatch, capsys):
    """Without an emulator the real credential lookup runs; it fails here on a missing key file
    (locally: no metadata server is asked)."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", os.path.join(os.sep, "nonexistent", "key.json"))
    url = "gs://some-bucket/runs/x"
    assert cli.main(["generate", "--model", "unused", "--prompts", "unused", "--out", url]) == 2
    error = capsys.readouterr().err
    assert url in error and "no Google Cloud credentials" in error and "Traceback" not in error
