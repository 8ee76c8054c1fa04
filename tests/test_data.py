"""Tests for spacejax.sources (row files) and spacejax.data (validation, tokenization, batching), and the
bundled assets."""

import hashlib
import json
import logging

import numpy as np
import pytest
from transformers import AutoTokenizer

from spacejax import data, sources
from spacejax.assets import TINY_CHAT_PATH, TINY_TOKENIZER_DIR, make_assets

PAD, BOS, EOS, USER, ASSISTANT, SYSTEM = range(6)

CONVERSATION = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "Now double it."},
    {"role": "assistant", "content": "Double 5 is 10."},
]
PROMPT_TEXT = ("<|bos|><|user|>\nWhat is 2 plus 3?<|eos|>\n<|assistant|>\n2 plus 3 is 5.<|eos|>\n"
               "<|user|>\nNow double it.<|eos|>\n<|assistant|>\n")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat_row(question, answer):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


# ----------------------------------------------------------------------------- assets


def test_bundled_tokenizer_special_tokens_and_template(tokenizer):
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    assert tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>", "<|system|>"]) == [USER, ASSISTANT, SYSTEM]
    text = tokenizer.apply_chat_template(CONVERSATION[:3], add_generation_prompt=True, tokenize=False)
    assert text == PROMPT_TEXT
    no_generation_prompt = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert no_generation_prompt == PROMPT_TEXT[: -len("<|assistant|>\n")]
    assert tokenizer.decode(encode(tokenizer, PROMPT_TEXT)) == PROMPT_TEXT  # byte-level round trip


def test_bundled_chat_rows_are_ultrachat_format():
    rows = sources.read_rows(TINY_CHAT_PATH)
    assert len(rows) == 300
    assert len({row["prompt_id"] for row in rows}) == 300
    for row in rows:
        first_user = next(m for m in row["messages"] if m["role"] == "user")
        assert row["prompt"] == first_user["content"]
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert row["messages"][-1]["role"] == "assistant"
    assert any(len(row["messages"]) > 2 and row["messages"][0]["role"] == "user" for row in rows)
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert TINY_CHAT_PATH.stat().st_size < 300_000


def test_make_assets_is_deterministic(tmp_path):
    make_assets.main(["--out", str(tmp_path)])
    assert (tmp_path / "tiny_chat.jsonl").read_bytes() == TINY_CHAT_PATH.read_bytes()
    committed = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert sorted(p.name for p in (tmp_path / "tiny_tokenizer").iterdir()) == committed
    for name in committed:
        assert (tmp_path / "tiny_tokenizer" / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name


def test_bundled_dataset_tokenizes_without_bad_rows(tokenizer):
    examples, skipped = data.load_examples(TINY_CHAT_PATH, tokenizer, max_length=256, max_prompt_length=128)
    assert skipped == 0 and len(examples) == 300
    assert all(e.prompt_ids[0] == BOS and e.real_ids[-1] == EOS for e in examples)
    first = examples[:16]
    length = data.bucket_length(max(len(e.prompt_ids) + len(e.real_ids) for e in first), 256)
    assert length in (64, 128)
    batch = data.pad_sequences([e.prompt_ids for e in first], [e.real_ids for e in first], length=length, pad_id=PAD)
    assert batch["tokens"].shape == (16, length)


# ----------------------------------------------------------------------------- tokenization


def test_exact_tokens_and_masks(tokenizer):
    response_ids = encode(tokenizer, "Double 5 is 10.") + [EOS]
    expected_prompt = encode(tokenizer, PROMPT_TEXT)
    # The concatenation must equal tokenizing the whole rendered conversation in one go.
    expected = encode(tokenizer, PROMPT_TEXT + "Double 5 is 10.<|eos|>")
    assert expected == expected_prompt + response_ids

    example = data.tokenize_row({"messages": CONVERSATION}, tokenizer, max_length=512, max_prompt_length=256)
    np.testing.assert_array_equal(example.prompt_ids, expected_prompt)
    np.testing.assert_array_equal(example.real_ids, response_ids)
    assert example.generated_ids is None
    assert example.prompt_ids.dtype == example.real_ids.dtype == np.int32

    short = data.tokenize_row(chat_row("Hi?", "Hello."), tokenizer, max_length=512, max_prompt_length=256)
    length = data.bucket_length(max(len(e.prompt_ids) + len(e.real_ids) for e in (example, short)), 512)
    assert length == 64
    batch = data.pad_sequences([example.prompt_ids, short.prompt_ids], [example.real_ids, short.real_ids],
                               length=length, pad_id=PAD)
    assert set(batch) == {"tokens", "loss_mask", "attention_mask"}
    assert batch["tokens"].shape == (2, 64) and batch["tokens"].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32 and batch["attention_mask"].dtype == np.int32

    n_prompt, n = len(expected_prompt), len(expected)
    np.testing.assert_array_equal(batch["tokens"][0], expected + [PAD] * (64 - n))
    np.testing.assert_array_equal(batch["loss_mask"][0], [0.0] * n_prompt + [1.0] * (n - n_prompt) + [0.0] * (64 - n))
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * n + [0] * (64 - n))
    # The prompt ends with the generation prompt; the first target follows "<|assistant|>\n".
    assert batch["tokens"][0, n_prompt - 2] == ASSISTANT
    assert tokenizer.decode(batch["tokens"][0, np.flatnonzero(batch["loss_mask"][0])]) == "Double 5 is 10.<|eos|>"

    short_ids = encode(tokenizer, "<|bos|><|user|>\nHi?<|eos|>\n<|assistant|>\nHello.<|eos|>")
    short_prompt = encode(tokenizer, "<|bos|><|user|>\nHi?<|eos|>\n<|assistant|>\n")
    np.testing.assert_array_equal(batch["tokens"][1], short_ids + [PAD] * (64 - len(short_ids)))
    assert batch["loss_mask"][1].sum() == len(short_ids) - len(short_prompt)
    assert batch["loss_mask"][1, len(short_prompt)] == 1.0 and batch["loss_mask"][1, len(short_prompt) - 1] == 0.0
    # Every target has a real token before it (logits at t-1 predict token t).
    targets = np.argwhere(batch["loss_mask"] == 1.0)
    assert (targets[:, 1] >= 1).all() and (batch["attention_mask"][targets[:, 0], targets[:, 1] - 1] == 1).all()


def test_spin_pair_rows_share_the_prompt(tokenizer):
    user = {"role": "user", "content": "What color is snow?"}
    row = {"real": [user, {"role": "assistant", "content": "Snow is usually white."}],
           "generated": [user, {"role": "assistant", "content": "Snow is blue, I think, or maybe not."}]}
    example = data.tokenize_row(row, tokenizer, max_length=128, max_prompt_length=64)
    prompt = encode(tokenizer, "<|bos|><|user|>\nWhat color is snow?<|eos|>\n<|assistant|>\n")
    np.testing.assert_array_equal(example.prompt_ids, prompt)
    np.testing.assert_array_equal(example.real_ids, encode(tokenizer, "Snow is usually white.") + [EOS])
    np.testing.assert_array_equal(example.generated_ids, encode(tokenizer, "Snow is blue, I think, or maybe not.") + [EOS])

    length = data.bucket_length(len(prompt) + len(example.generated_ids), 128, (16, 32, 64))
    batch = data.pad_pairs([example.prompt_ids], [example.real_ids], [[example.generated_ids]], length=length,
                           pad_id=PAD)
    assert sorted(batch) == sorted(f"{side}_{key}" for side in ("real", "generated")
                                   for key in ("tokens", "loss_mask", "attention_mask"))
    assert batch["real_tokens"].shape == (1, length) and batch["generated_tokens"].shape == (1, 1, length)
    np.testing.assert_array_equal(batch["real_tokens"][0, :len(prompt)], batch["generated_tokens"][0, 0, :len(prompt)])
    for side, response in (("real", example.real_ids), ("generated", example.generated_ids)):
        mask = batch[f"{side}_loss_mask"].reshape(length)
        assert np.flatnonzero(mask).tolist() == list(range(len(prompt), len(prompt) + len(response)))
        np.testing.assert_array_equal(batch[f"{side}_tokens"].reshape(length)[mask == 1], response)
    with pytest.raises(ValueError, match="same number of synthetic responses"):
        data.pad_pairs([prompt, prompt], [example.real_ids] * 2, [[example.generated_ids], []], length=length,
                       pad_id=PAD)


def test_token_id_rows_are_used_verbatim():
    row = {"prompt_ids": [1, 3, 10], "real_ids": [20, 21], "generated_ids": np.array([30], np.int32)}
    example = data.tokenize_row(row, max_length=8, max_prompt_length=4, vocab_size=40)
    assert example.prompt_ids.tolist() == [1, 3, 10] and example.real_ids.tolist() == [20, 21]
    assert example.generated_ids.tolist() == [30]  # no EOS appended to pre-tokenized responses
    alias = data.tokenize_row({"prompt_ids": [1], "response_ids": [5, 6]}, max_length=8, max_prompt_length=4, vocab_size=40)
    assert alias.real_ids.tolist() == [5, 6] and alias.generated_ids is None
    with pytest.raises(ValueError, match="vocab_size"):
        data.tokenize_row(row, max_length=8, max_prompt_length=4)


def test_truncation_keeps_prompt_end_and_response_start(tokenizer):
    question = " ".join(f"word{i}" for i in range(60)) + "?"
    answer = " ".join(f"reply{i}" for i in range(60)) + "."
    full_prompt = encode(tokenizer, f"<|bos|><|user|>\n{question}<|eos|>\n<|assistant|>\n")
    full_response = encode(tokenizer, answer) + [EOS]
    assert len(full_prompt) > 40 and len(full_response) > 40

    long_prompt = data.tokenize_row(chat_row(question, "Ok."), tokenizer, max_length=48, max_prompt_length=20)
    np.testing.assert_array_equal(long_prompt.prompt_ids, full_prompt[-20:])
    assert long_prompt.prompt_ids[-2] == ASSISTANT  # the generation prompt survives
    np.testing.assert_array_equal(long_prompt.real_ids, encode(tokenizer, "Ok.") + [EOS])

    short_prompt = encode(tokenizer, "<|bos|><|user|>\nHi?<|eos|>\n<|assistant|>\n")
    long_response = data.tokenize_row(chat_row("Hi?", answer), tokenizer, max_length=48, max_prompt_length=20)
    np.testing.assert_array_equal(long_response.prompt_ids, short_prompt)
    np.testing.assert_array_equal(long_response.real_ids, full_response[:48 - len(short_prompt)])
    assert EOS not in long_response.real_ids  # cut responses lose their EOS

    both = data.tokenize_row({"real": chat_row(question, answer)["messages"],
                              "generated": chat_row(question, "Short.")["messages"]},
                             tokenizer, max_length=48, max_prompt_length=20)
    np.testing.assert_array_equal(both.prompt_ids, full_prompt[-20:])
    np.testing.assert_array_equal(both.real_ids, full_response[:28])
    np.testing.assert_array_equal(both.generated_ids, encode(tokenizer, "Short.") + [EOS])

    cut = [long_prompt, long_response, both]
    length = data.bucket_length(max(len(e.prompt_ids) + len(e.real_ids) for e in cut), 48)
    assert length == 48  # max_length is the last bucket (48 < 64)
    batch = data.pad_sequences([e.prompt_ids for e in cut], [e.real_ids for e in cut], length=length, pad_id=PAD)
    assert batch["tokens"].shape == (3, 48)
    assert batch["loss_mask"][2].sum() == 28 and batch["attention_mask"][2].sum() == 48
    pair = data.pad_pairs([both.prompt_ids], [both.real_ids], [[both.generated_ids]], length=length, pad_id=PAD)
    np.testing.assert_array_equal(pair["real_loss_mask"][0], batch["loss_mask"][2])
    assert pair["generated_loss_mask"][0, 0].sum() == len(both.generated_ids)
    assert pair["generated_attention_mask"][0, 0].sum() == 20 + len(both.generated_ids)
    with pytest.raises(ValueError, match="row 0 has 49 tokens, more than the batch length 48"):
        data.pad_sequences([both.prompt_ids], [np.concatenate([both.real_ids, [EOS]])], length=48, pad_id=PAD)

    for max_length, max_prompt_length in ((16, 16), (16, 0), (8, 20)):
        with pytest.raises(ValueError, match="max_prompt_length"):
            data.tokenize_row(chat_row("Hi?", "Ok."), tokenizer, max_length=max_length,
                              max_prompt_length=max_prompt_length)


def test_bucket_length():
    assert [data.bucket_length(n, 1024) for n in (1, 64, 65, 128, 129, 600, 1024)] == [64, 64, 128, 128, 256, 1024, 1024]
    assert [data.bucket_length(n, 100) for n in (10, 64, 65, 100)] == [64, 64, 100, 100]
    assert data.bucket_length(5, 2048, buckets=(8, 4096)) == 8
    assert data.bucket_length(9, 2048, buckets=(8, 4096)) == 2048
    with pytest.raises(ValueError, match="exceeds max_length=100"):
        data.bucket_length(101, 100)


# ----------------------------------------------------------------------------- bad rows

USER_OK = {"role": "user", "content": "Hi?"}
ASSISTANT_OK = {"role": "assistant", "content": "Hello."}
BAD_ROWS = [
    ({"prompt": "Hi?"}, "has no `messages`"),
    ([USER_OK], "a row must be an object, got list"),
    ({"messages": "Hi?"}, "`messages` must be a list"),
    ({"messages": []}, "`messages` is an empty list"),
    ({"messages": [USER_OK]}, "`messages` has no assistant turn"),
    ({"messages": [ASSISTANT_OK]}, "no user turn before its last assistant turn (empty prompt)"),
    ({"messages": [USER_OK, {"role": "assistant", "content": "  \n"}]}, "`messages[1]` (assistant) has empty content"),
    ({"messages": [{"role": "user", "content": ""}, ASSISTANT_OK]}, "`messages[0]` (user) has empty content"),
    ({"messages": [{"role": "user", "content": 7}, ASSISTANT_OK]}, "`messages[0]` content must be a string, got int"),
    ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT_OK]}, "`messages[0]` has unknown role 'bot'"),
    ({"messages": [USER_OK, {"text": "Hello."}]}, "`messages[1]` must be an object with `role` and `content`"),
    ({"real": [USER_OK, ASSISTANT_OK]}, "needs both `real` and `generated`"),
    ({"real": [USER_OK, ASSISTANT_OK], "generated": "Hello."}, "`generated` must be a list"),
    ({"real": [USER_OK, ASSISTANT_OK], "generated": [USER_OK]}, "`generated` has no assistant turn"),
    ({"real": [USER_OK, ASSISTANT_OK], "generated": [{"role": "user", "content": "Bye?"}, ASSISTANT_OK]},
     "different prompt turns"),
    ({"prompt_ids": [1, 3, 9999], "real_ids": [5]}, "`prompt_ids[2]` = 9999 is outside the vocabulary [0, 512)"),
    ({"prompt_ids": [1], "real_ids": [-1]}, "`real_ids[0]` = -1 is outside the vocabulary"),
    ({"prompt_ids": [1], "real_ids": [5], "generated_ids": [512]}, "`generated_ids[0]` = 512 is outside"),
    ({"prompt_ids": [1, "a"], "real_ids": [5]}, "`prompt_ids` must be a list of integer token ids"),
    ({"prompt_ids": [1, True], "real_ids": [5]}, "`prompt_ids` must be a list of integer token ids"),
    ({"prompt_ids": [1], "response_ids": []}, "`response_ids` is empty"),
    ({"prompt_ids": [1]}, "needs `real_ids` (or `response_ids`)"),
]


@pytest.mark.parametrize("bad_row, reason", BAD_ROWS, ids=[reason[:30] for _, reason in BAD_ROWS])
def test_bad_row_error_names_file_line_and_fix(tmp_path, tokenizer, bad_row, reason):
    good = chat_row("What is 1 plus 1?", "2.")
    path = write_jsonl(tmp_path / "chats.jsonl", [good, good, bad_row, good])
    with pytest.raises(data.DataError) as info:
        data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32)
    message = str(info.value)
    assert str(path) in message and ": line 3: " in message
    assert reason in message
    assert "data.skip_bad_rows=true" in message
    assert isinstance(info.value, ValueError)


def test_skip_bad_rows_counts_and_warns(tmp_path, tokenizer, caplog):
    rows, good_indices = [], []
    for bad_row, _ in BAD_ROWS:
        good_indices.append(len(rows))
        rows += [chat_row(f"What is {len(rows)} plus 1?", "A number."), bad_row]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="spacejax.data"):
        examples, skipped = data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32,
                                               skip_bad_rows=True)
    assert skipped == len(BAD_ROWS)
    assert [e.row_index for e in examples] == good_indices
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped {len(BAD_ROWS)} bad row(s) of {len(rows)}" in warnings[0] and "mixed.jsonl" in warnings[0]

    only_bad = write_jsonl(tmp_path / "only_bad.jsonl", [bad for bad, _ in BAD_ROWS[:3]])
    with pytest.raises(data.DataError, match=r"only_bad.jsonl: no usable rows \(3 read, 3 bad"):
        data.load_examples(only_bad, tokenizer, max_length=64, max_prompt_length=32, skip_bad_rows=True)


def test_file_errors(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(chat_row("a?", "b.")) + "\n\n" + '{"messages": [\n' + json.dumps(chat_row("c?", "d.")) + "\n")
    with pytest.raises(sources.DataError, match=r"broken.jsonl: line 3 is not valid JSON"):
        sources.read_rows(path)
    with pytest.raises(FileNotFoundError, match=r"nowhere.jsonl: no such file or directory. Pass a .jsonl"):
        sources.read_rows(tmp_path / "nowhere.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(sources.DataError, match=r"rows.csv: unsupported file type '.csv'"):
        sources.read_rows(tmp_path / "rows.csv")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(sources.DataError, match=r"plain_dir: a directory, but not one written by datasets"):
        sources.read_rows(tmp_path / "plain_dir")


# ----------------------------------------------------------------------------- sources


@pytest.fixture(scope="module")
def sample_rows():
    rows = sources.read_rows(TINY_CHAT_PATH)[:12]
    rows[0] = {**rows[0], "messages": rows[0]["messages"] + [{"role": "user", "content": "é ✓ 中"},
                                                            {"role": "assistant", "content": "Unicode ok."}]}
    return rows


def test_read_jsonl_and_parquet(tmp_path, sample_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert sources.read_rows(write_jsonl(tmp_path / "rows.jsonl", sample_rows)) == sample_rows
    pq.write_table(pa.Table.from_pylist(sample_rows), tmp_path / "rows.parquet")
    assert sources.read_rows(str(tmp_path / "rows.parquet")) == sample_rows


def test_read_datasets_save_to_disk(tmp_path, sample_rows):
    import datasets

    datasets.Dataset.from_list(sample_rows).save_to_disk(str(tmp_path / "single"))
    assert sources.read_rows(tmp_path / "single") == sample_rows

    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(sample_rows[:8]),
                          "test_sft": datasets.Dataset.from_list(sample_rows[8:])}).save_to_disk(str(tmp_path / "dict"))
    assert sources.read_rows(tmp_path / "dict", split="test_sft") == sample_rows[8:]
    with pytest.raises(sources.DataError, match=r"splits \['test_sft', 'train_sft'\]; pass split="):
        sources.read_rows(tmp_path / "dict")
    with pytest.raises(sources.DataError, match="got 'train'"):
        sources.read_rows(tmp_path / "dict", split="train")

    datasets.DatasetDict({"train": datasets.Dataset.from_list(sample_rows)}).save_to_disk(str(tmp_path / "one"))
    assert sources.read_rows(tmp_path / "one") == sample_rows


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, sample_rows):
    """Two tiny TFDS datasets prepared as array_record: turns as JSON text, and as a Sequence."""
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()
    features = tfds.features

    class SpacejaxTestChatJson(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features.FeaturesDict({
                "prompt": features.Text(), "prompt_id": features.Text(), "messages": features.Text(),
                "prompt_ids": features.Sequence(np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(sample_rows):
                yield i, {"prompt": row["prompt"], "prompt_id": row["prompt_id"],
                          "messages": json.dumps(row["messages"]), "prompt_ids": [i, i + 1]}

    class SpacejaxTestChatSeq(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            turn = features.FeaturesDict({"role": features.Text(), "content": features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features.FeaturesDict({
                "prompt_id": features.Text(), "messages": features.Sequence(turn)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(sample_rows[:6]), "test": self._generate_examples(sample_rows[6:])}

        def _generate_examples(self, rows):
            for row in rows:
                yield row["prompt_id"], {"prompt_id": row["prompt_id"], "messages": row["messages"]}

    data_dir = tmp_path_factory.mktemp("tfds")
    for builder in (SpacejaxTestChatJson, SpacejaxTestChatSeq):
        builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def by_prompt_id(rows):
    return {row["prompt_id"]: row for row in rows}


def test_read_tfds_array_record(tfds_dir, sample_rows, tokenizer):
    import sys

    rows = sources.read_rows("tfds:spacejax_test_chat_json", data_dir=tfds_dir)
    assert len(rows) == len(sample_rows)
    expected = {row["prompt_id"]: {**row, "prompt_ids": [i, i + 1]} for i, row in enumerate(sample_rows)}
    assert by_prompt_id(rows) == expected
    assert all(type(i) is int for row in rows for i in row["prompt_ids"])

    test_rows = sources.read_rows("tfds:spacejax_test_chat_seq", split="test", data_dir=tfds_dir)
    assert by_prompt_id(test_rows) == {r["prompt_id"]: {"prompt_id": r["prompt_id"], "messages": r["messages"]}
                                       for r in sample_rows[6:]}
    assert len(sources.read_rows("tfds:spacejax_test_chat_seq", data_dir=tfds_dir)) == 6  # default: train

    via_tfds, _ = data.load_examples("tfds:spacejax_test_chat_seq", tokenizer, split="train", data_dir=tfds_dir,
                                     max_length=128, max_prompt_length=64)
    via_jsonl, _ = data.tokenize_rows(sample_rows[:6], tokenizer, max_length=128, max_prompt_length=64)
    key = lambda e: (e.prompt_ids.tolist(), e.real_ids.tolist())  # noqa: E731
    assert sorted(map(key, via_tfds)) == sorted(map(key, via_jsonl))

    with pytest.raises(FileNotFoundError, match="tfds:no_such_dataset_xyz: no prepared TFDS dataset"):
        sources.read_rows("tfds:no_such_dataset_xyz", data_dir=tfds_dir)
    assert "tensorflow" not in sys.modules
