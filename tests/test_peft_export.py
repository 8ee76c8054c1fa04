"""LoRA adapters exported in PEFT's format (hf.save_adapter) against peft on the transformers models."""

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from spacejax import hf, integrity, lora, model, storage
from spacejax.config import LoraConfig

from hf_models import save

FAMILIES = ("llama3", "mistral_window", "qwen2_bias")


def random_adapter(model_cfg, lora_cfg: LoraConfig, seed: int = 0) -> dict:
    """`lora.init` with b random too (std 0.02, the scale of the base weights), so the delta is not zero."""
    adapters = lora.init(model_cfg, lora_cfg, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(adapters))
    return {target: {"a": factors["a"], "b": 0.02 * jax.random.normal(key, factors["b"].shape)}
            for key, (target, factors) in zip(keys, adapters.items())}


def torch_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(tokens)).logits.numpy()


def load_hf(directory) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_the_adapter_as_the_merged_model(family, tmp_path):
    save(family, tmp_path / "base")
    cfg, params = hf.load(tmp_path / "base")
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    adapters = random_adapter(cfg, lora_cfg)
    merged = lora.merged(lora_cfg, params, adapters)
    hf.save_adapter(cfg, lora_cfg, adapters, tmp_path / "adapter", base_model_path=tmp_path / "base")

    peft_model = peft.PeftModel.from_pretrained(load_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(3, 20))
    expected, _ = model.apply(cfg, merged, tokens)
    base, _ = model.apply(cfg, params, tokens)
    got = torch_logits(peft_model, tokens)
    assert np.abs(np.asarray(expected) - np.asarray(base)).max() > 1e-2  # the adapter changes the logits
    assert np.abs(got - np.asarray(expected)).max() <= 1e-4

    # merged by peft == merged by spacejax and exported whole
    hf.save(cfg, merged, tmp_path / "merged")
    want = load_hf(tmp_path / "merged").state_dict()
    unloaded = peft_model.merge_and_unload().state_dict()
    assert set(unloaded) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(unloaded[name], tensor, rtol=0, atol=1e-5, msg=name)


def test_only_the_configured_targets_are_exported(tmp_path):
    save("llama3", tmp_path / "base")
    cfg, params = hf.load(tmp_path / "base")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("q", "v"))
    hf.save_adapter(cfg, lora_cfg, random_adapter(cfg, lora_cfg), tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / hf.ADAPTER_CONFIG_FILE).read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, None)
    tensors = load_file(tmp_path / "adapter" / hf.ADAPTER_WEIGHTS_FILE)
    kv_width = cfg.num_kv_heads * cfg.head_dim
    want = {}
    for i in range(cfg.num_layers):
        for module, width in (("q_proj", cfg.num_heads * cfg.head_dim), ("v_proj", kv_width)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}."
            want[prefix + "lora_A.weight"] = (4, cfg.hidden_size)
            want[prefix + "lora_B.weight"] = (width, 4)
    assert {name: value.shape for name, value in tensors.items()} == want

    peft_model = peft.PeftModel.from_pretrained(load_hf(tmp_path / "base"), tmp_path / "adapter")
    adapted = {name.split(".")[-1] for name, module in peft_model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)}
    assert adapted == {"q_proj", "v_proj"}


def test_mismatched_adapters_are_refused(tmp_path):
    save("llama3", tmp_path / "base")
    cfg, _ = hf.load(tmp_path / "base")
    adapters = random_adapter(cfg, LoraConfig(rank=4, targets=("q", "v")))
    with pytest.raises(ValueError, match="do not match lora.targets"):
        hf.save_adapter(cfg, LoraConfig(rank=4, targets=("q",)), adapters, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_adapter_export_to_gcs_equals_the_local_one(gcs, tmp_path):
    save("qwen2_bias", tmp_path / "base")
    cfg, _ = hf.load(tmp_path / "base")
    lora_cfg = LoraConfig(rank=4, alpha=8.0, targets=("o", "down"))
    adapters = random_adapter(cfg, lora_cfg)
    url = gcs("adapter")
    hf.save_adapter(cfg, lora_cfg, adapters, url, base_model_path="gs://bucket/base")
    hf.save_adapter(cfg, lora_cfg, adapters, tmp_path / "local", base_model_path="gs://bucket/base")

    with storage.local_copy(storage.location(url)) as remote:
        assert sorted(f.name for f in remote.iterdir()) == sorted(
            [hf.ADAPTER_CONFIG_FILE, hf.ADAPTER_WEIGHTS_FILE, integrity.MANIFEST])
        config = (remote / hf.ADAPTER_CONFIG_FILE).read_text()
        assert config == (tmp_path / "local" / hf.ADAPTER_CONFIG_FILE).read_text()
        got = load_file(remote / hf.ADAPTER_WEIGHTS_FILE)
    want = load_file(tmp_path / "local" / hf.ADAPTER_WEIGHTS_FILE)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
