"""Random tiny `transformers` models of each supported family, built and saved inside tests."""

import torch
import transformers

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
              rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (config class, extra config); all have fewer kv heads than heads.
FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "mistral_window": (transformers.MistralConfig, dict(sliding_window=24)),
    "qwen2_bias": (transformers.Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
}


def build(family: str, seed: int = 0, **extra) -> transformers.PreTrainedModel:
    """A float32 model with random weights (biases and norms randomised too, so bugs show)."""
    config_class, family_extra = FAMILIES[family]
    config = config_class(**{**COMMON, **family_extra, **extra})
    torch.manual_seed(seed)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, tensor in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor) if "norm" in name
                             else 0.1 * torch.randn_like(tensor))
    return hf_model.eval()


def save(family: str, directory, seed: int = 0, **extra) -> transformers.PreTrainedModel:
    hf_model = build(family, seed, **extra)
    hf_model.save_pretrained(directory)
    return hf_model
