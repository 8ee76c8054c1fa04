"""Hugging Face round trips (load -> save -> transformers; convert both ways) and error messages."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from spacejax import checkpoint, cli, hf

from hf_models import FAMILIES, save


def assert_same_tensors(expected: transformers.PreTrainedModel, directory):
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert type(reloaded) is type(expected)
    want, got = expected.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_save_reproduces_every_tensor(family, tmp_path):
    original = save(family, tmp_path / "in")
    cfg, params = hf.load(tmp_path / "in")
    hf.save(cfg, params, tmp_path / "out")
    assert_same_tensors(original, tmp_path / "out")
    assert hf.load(tmp_path / "out")[0] == cfg


def test_sharded_save_writes_an_index_and_loads_back(tmp_path):
    original = save("llama3", tmp_path / "in")
    cfg, params = hf.load(tmp_path / "in")
    hf.save(cfg, params, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    shard_files = set(index["weight_map"].values())
    assert len(shard_files) > 3
    assert not (tmp_path / "sharded" / hf.SINGLE_FILE).exists()
    assert_same_tensors(original, tmp_path / "sharded")
    # and our loader reads the sharded form back to the same params
    _, again = hf.load(tmp_path / "sharded")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_convert_from_hf_then_to_hf_reproduces_every_tensor(tmp_path):
    original = save("qwen2_bias", tmp_path / "hf")
    assert cli.main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    assert checkpoint.is_params_checkpoint(tmp_path / "ckpt")
    assert cli.main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")]) == 0
    assert_same_tensors(original, tmp_path / "back")


def test_convert_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    save("llama_tied", tmp_path / "hf")
    args = ["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]
    assert cli.main(args) == 0
    assert cli.main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_unsupported_architecture_is_named(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    with pytest.raises(hf.CheckpointError, match="unsupported architecture 'gpt2'"):
        hf.load(tmp_path)


def rewrite_checkpoint(directory, edit):
    path = directory / hf.SINGLE_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save("llama3", tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        hf.load(tmp_path)


def test_misshapen_tensor_is_named_with_both_shapes(tmp_path):
    save("llama3", tmp_path)

    def truncate(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]

    rewrite_checkpoint(tmp_path, truncate)
    with pytest.raises(hf.CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight'.*\(31, 64\).*\(32, 64\)"):
        hf.load(tmp_path)


def test_missing_directory_and_weights_are_named(tmp_path):
    with pytest.raises(hf.CheckpointError, match="config.json not found"):
        hf.load(tmp_path / "nowhere")
    save("llama3", tmp_path)
    (tmp_path / hf.SINGLE_FILE).unlink()
    with pytest.raises(hf.CheckpointError, match="neither model.safetensors nor"):
        hf.load(tmp_path)
