"""Tiny bundled assets for tests, demos and CPU runs; regenerate with
``python -m spacejax.assets.make_assets`` (deterministic, offline).

- ``TINY_CHAT_PATH``: ``tiny_chat.jsonl``, 300 procedurally generated chat rows in UltraChat
  format ``{"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}``.
- ``TINY_TOKENIZER_DIR``: a byte-level BPE tokenizer trained on those rows (vocabulary 512,
  ``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2, ``<|user|>``, ``<|assistant|>``, ``<|system|>``)
  with a zephyr-like chat template; ``transformers.AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)``
  loads it offline.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TINY_CHAT_PATH = ASSETS_DIR / "tiny_chat.jsonl"
TINY_TOKENIZER_DIR = ASSETS_DIR / "tiny_tokenizer"

__all__ = ["ASSETS_DIR", "TINY_CHAT_PATH", "TINY_TOKENIZER_DIR"]
