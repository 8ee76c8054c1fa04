"""The mesh: shapes, placement, invariance of the loop's losses to the mesh, and a real
two-process `jax.distributed` run on loopback against the single-process run."""

from pathlib import Path

import jax
import numpy as np
import pytest

from spacejax import checkpoint, hf, metrics, selfplay, sharding
from spacejax.config import ConfigError, MeshConfig, ModelConfig, load

# run_processes: test_lm_eval and test_sampler import it from here
from runs import TWO_PROCESSES, run_processes, train_arguments  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
TINY = ["selfplay.sft_epochs=0", "selfplay.iterations=1", "data.num_train=64", "data.num_eval=16",
        "selfplay.eval_kl_samples=128", "train.epochs=1", "train.batch_size=16", "checkpoint.every_steps=2",
        "sampler.batch_size=32"]


def test_mesh_fills_minus_one_and_can_use_fewer_devices():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.mesh_sizes(MeshConfig(data=2, fsdp=-1, tensor=4), 64) == {"data": 2, "fsdp": 8, "tensor": 4}
    assert sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1)).devices.size == 1
    with pytest.raises(ConfigError, match="need 16 devices"):
        sharding.make_mesh(MeshConfig(data=4, fsdp=4, tensor=1))
    with pytest.raises(ConfigError, match="not divisible by 3"):
        sharding.make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))


def test_params_follow_the_logical_rules_and_replicate_what_does_not_divide():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = ModelConfig(vocab_size=15, num_kv_heads=1, num_heads=4)
    specs = jax.tree.map(lambda s: tuple(s.spec), sharding.param_shardings(cfg, mesh))
    assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == (None, "fsdp", "tensor", None)
    assert specs["layers"]["self_attn"]["k_proj"]["kernel"] == (None, "fsdp", None, None)  # 1 kv head
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == (None, "tensor", "fsdp")
    assert specs["embed_tokens"]["embedding"] == (None, "fsdp")  # vocab 15 does not divide by 2
    abstract = jax.sharding.AbstractMesh((2, 2, 2), sharding.AXES)  # as `spacejax plan` places them
    assert jax.tree.map(lambda s: tuple(s.spec), sharding.param_shardings(cfg, abstract)) == specs


def test_process_rows_cover_the_batch_in_one_process():
    mesh = sharding.make_mesh(MeshConfig())
    assert sharding.process_rows(mesh, 32) == slice(0, 32)
    placed = sharding.put_batch({"x": np.arange(32 * 3).reshape(32, 3)}, mesh, 32)["x"]
    assert placed.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(sharding.to_host(placed), np.arange(32 * 3).reshape(32, 3))


def step_losses(workdir):
    return np.array([r["loss"] for r in metrics.read(workdir) if "event" not in r])


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """tiny_space, one iteration, on the default mesh: 8 devices on the data axis."""
    workdir = tmp_path_factory.mktemp("reference")
    selfplay.run(load(ROOT / "configs" / "tiny_space.yaml", TINY), workdir)
    return workdir


@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2), (2, 1, 4), (1, 1, 1)])
def test_losses_do_not_depend_on_the_mesh(reference_run, tmp_path, mesh):
    overrides = TINY + [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"]
    selfplay.run(load(ROOT / "configs" / "tiny_space.yaml", overrides), tmp_path)
    reference = step_losses(reference_run)
    assert len(reference) == 4
    np.testing.assert_allclose(step_losses(tmp_path), reference, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """runs.TWO_PROCESSES in this process (8 devices), as the `two_process_run` of conftest."""
    workdir = tmp_path_factory.mktemp("one_process")
    selfplay.run(load(ROOT / "configs" / "tiny_space.yaml", TWO_PROCESSES), workdir)
    return workdir


def test_two_processes_reproduce_the_single_process_run(two_process_run, one_process_run):
    np.testing.assert_allclose(step_losses(two_process_run), step_losses(one_process_run), atol=1e-5, rtol=0)
    one = [r for r in metrics.read(one_process_run) if "event" in r][0]
    two = [r for r in metrics.read(two_process_run) if "event" in r][0]
    assert two["eval/kl"] == pytest.approx(one["eval/kl"], abs=1e-4)

    # written by 2 processes, restored by 1 on another mesh
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = checkpoint.load_config(two_process_run / "iter_000" / "final")
    shardings = sharding.param_shardings(cfg, mesh)
    _, restored = checkpoint.load_params(two_process_run / "iter_000" / "final", shardings)
    _, expected = checkpoint.load_params(one_process_run / "iter_000" / "final")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_a_single_process_checkpoint_restores_in_two_processes(reference_run):
    final = reference_run / "iter_000" / "final"
    _, params = checkpoint.load_params(final)
    expected = sum(float(np.asarray(leaf, np.float64).sum()) for leaf in jax.tree.leaves(params))
    outputs = run_processes([str(Path(__file__).parent / "restore_worker.py"), str(final)])
    for output in outputs:
        assert f"checksum {expected:.6f}" in output, output[-2000:]


def test_two_processes_export_params_sharded_across_both_to_hugging_face(tmp_path):
    """fsdp 8 over 2 processes of 4 devices: every embed dimension is split across the processes,
    and the export gathers it; the exported model is the run's final params."""
    workdir = tmp_path / "fsdp"
    run_processes(train_arguments(workdir, [*TINY, "mesh.data=1", "mesh.fsdp=8", "checkpoint.export_hf=true"]))
    cfg, exported = hf.load(workdir / "hf" / "iter_000")
    placed = sharding.param_shardings(cfg, sharding.make_mesh(MeshConfig(data=1, fsdp=8)))
    assert placed["layers"]["mlp"]["up_proj"]["kernel"].spec[1] == "fsdp"  # embed: split over both processes
    _, final = checkpoint.load_params(workdir / "iter_000" / "final")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
