"""Regenerate the tiny bundled assets: ``python -m spacejax.assets.make_assets [--out DIR]``.

Writes ``tiny_chat.jsonl`` (chat rows in UltraChat format, made from templates with a fixed
seed) and ``tiny_tokenizer/`` (a byte-level BPE tokenizer trained on those rows, saved with
``save_pretrained``). Nothing is downloaded, and re-running writes byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from pathlib import Path

SEED = 0
NUM_ROWS = 300
VOCAB_SIZE = 512

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_TOKENS  # ids 0..5 in this order

# Zephyr-like: BOS, then every turn as "<|role|>\n{content}<|eos|>\n"; the generation prompt
# opens an assistant turn. A response rendered by the data pipeline is "{content}<|eos|>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = (
    "apple", "banana", "river", "mountain", "garden", "window", "pencil", "rocket", "castle",
    "forest", "guitar", "planet", "bridge", "candle", "dragon", "island", "kitten", "ladder",
    "market", "needle", "orange", "pepper", "rabbit", "silver", "tunnel", "violin", "winter",
    "yellow", "zebra", "cloud", "stone", "music", "ocean", "paper", "queen", "table", "train",
)
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("high", "low"), ("strong", "weak"),
    ("young", "old"), ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"), ("up", "down"),
)
THINGS = (
    ("a banana", "yellow"), ("grass", "green"), ("the sky", "blue"), ("snow", "white"),
    ("coal", "black"), ("a tomato", "red"), ("an orange", "orange"), ("a carrot", "orange"),
    ("a lemon", "yellow"), ("a plum", "purple"), ("chocolate", "brown"), ("a cloud", "white"),
)
ANIMALS = (
    ("cat", "meow", 4), ("dog", "woof", 4), ("cow", "moo", 4), ("duck", "quack", 2),
    ("sheep", "baa", 4), ("owl", "hoot", 2), ("horse", "neigh", 4), ("frog", "ribbit", 4),
    ("chicken", "cluck", 2), ("lion", "roar", 4), ("pig", "oink", 4), ("goose", "honk", 2),
)
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly."


def _arithmetic(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    op = rng.choice(("plus", "minus", "times"))
    c = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    question = rng.choice((
        f"What is {a} {op} {b}?",
        f"Can you tell me what {a} {op} {b} is?",
        f"Please compute {a} {op} {b}.",
        f"Quick question: {a} {op} {b}?",
    ))
    answer = rng.choice((f"{a} {op} {b} is {c}.", f"The answer is {c}.", f"{a} {op} {b} equals {c}."))
    return question, answer, c


def _word_fact(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    kind = rng.randrange(3)
    if kind == 0:
        return (f'How many letters are in the word "{word}"?',
                f'The word "{word}" has {len(word)} letters.', word)
    if kind == 1:
        return (f'What is the first letter of "{word}"?',
                f'The first letter of "{word}" is "{word[0]}".', word)
    return f'Spell "{word}" backwards.', f'"{word}" spelled backwards is "{word[::-1]}".', word


def _single_turn(rng: random.Random) -> list[tuple[str, str]]:
    kind = rng.randrange(5)
    if kind == 0:
        question, answer, _ = _arithmetic(rng)
    elif kind == 1:
        question, answer, _ = _word_fact(rng)
    elif kind == 2:
        word, opposite = rng.choice(OPPOSITES)
        question, answer = f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    elif kind == 3:
        thing, color = rng.choice(THINGS)
        question, answer = f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is usually {color}."
    else:
        animal, sound, legs = rng.choice(ANIMALS)
        if rng.random() < 0.5:
            question, answer = f"What sound does a {animal} make?", f"A {animal} says {sound}."
        else:
            question, answer = f"How many legs does a {animal} have?", f"A {animal} has {legs} legs."
    return [(question, answer)]


def _multi_turn(rng: random.Random) -> list[tuple[str, str]]:
    if rng.random() < 0.5:
        question, answer, c = _arithmetic(rng)
        turns = [(question, answer), ("Now double it.", f"Double {c} is {2 * c}.")]
        if rng.random() < 0.5:
            turns.append(("And add one?", f"{2 * c} plus 1 is {2 * c + 1}."))
        return turns
    question, answer, word = _word_fact(rng)
    turns = [(question, answer), ("And the last letter?", f'The last letter of "{word}" is "{word[-1]}".')]
    if rng.random() < 0.5:
        turns.append(("Write it in capital letters.", f'In capital letters it is "{word.upper()}".'))
    return turns


def make_chat_rows(num_rows: int = NUM_ROWS, seed: int = SEED) -> list[dict]:
    """Chat rows in UltraChat format, unique by prompt; about 25% multi-turn, 10% with a system turn."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < num_rows:
        turns = _multi_turn(rng) if rng.random() < 0.25 else _single_turn(rng)
        with_system = rng.random() < 0.1
        prompt = turns[0][0]
        if prompt in seen:
            continue
        seen.add(prompt)
        messages = [{"role": "system", "content": SYSTEM_PROMPT}] if with_system else []
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt_id = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        rows.append({"prompt": prompt, "prompt_id": prompt_id, "messages": messages})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def train_tokenizer(rows: list[dict], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on every message of ``rows``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [message["content"] for row in rows for message in row["messages"]]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        model_max_length=2048,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="output directory (default: the installed spacejax/assets/)")
    args = parser.parse_args(argv)
    # Single-threaded training: the merge order must not depend on thread scheduling.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    args.out.mkdir(parents=True, exist_ok=True)
    rows = make_chat_rows()
    write_jsonl(rows, args.out / "tiny_chat.jsonl")
    tokenizer = train_tokenizer(rows)
    tokenizer.save_pretrained(str(args.out / "tiny_tokenizer"))
    print(f"wrote {len(rows)} rows to {args.out / 'tiny_chat.jsonl'} and a tokenizer "
          f"({len(tokenizer)} tokens) to {args.out / 'tiny_tokenizer'}")


if __name__ == "__main__":
    main()
