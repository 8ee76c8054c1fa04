"""SPIN's conventions (issue 18): its reformat output, a fixed training subset of row ids, its
generation prompt, TRL's metric names and pair rows, and a pinned `init_from_revision`."""

import json
import logging
import math
from pathlib import Path

import datasets
import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants as hub_constants

from spacejax import config, data, hf, losses, metrics, model, selfplay, sources
from spacejax.assets import TINY_CHAT_PATH, TINY_TOKENIZER_DIR
from spacejax.config import ConfigError
from spacejax.pairs import Pairs
from spacejax.sampler import SamplerGenerator
from spacejax.selfplay import store
from spacejax.selfplay.setup import check_init_from
from spacejax.selfplay.task import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SPIN_JSON = DATA / "spin_reformat_train.json"  # exactly what spin/reformat.py's save_to_json writes
ROW_IDS = DATA / "spin_row_ids.txt"
LISTED = [9, 0, 2, 11, 5, 3, 8, 6]  # the positions ROW_IDS lists, in its order
HUB_ID = "spin-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LENGTHS = dict(max_length=128, max_prompt_length=64)


@pytest.fixture(scope="module")
def tokenizer():
    return hf.load_tokenizer(TINY_TOKENIZER_DIR)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def spin_reformat_output(directory) -> Path:
    """SPIN's reformat output made as spin/reformat.py makes it: its train.json read by datasets'
    json loader, and that table written as train_prefs-00000-of-00001.parquet."""
    dataset = datasets.load_dataset("json", data_files=str(SPIN_JSON), split="train",
                                    cache_dir=str(directory / "cache"))
    path = directory / "train_prefs-00000-of-00001.parquet"
    pq.write_table(dataset.data.table, path)
    return path


# ----------------------------------------------------------------------------- SPIN's data


def test_spin_reformat_rows_are_prompts_whose_synthetic_response_the_loop_generates(tmp_path, tokenizer):
    parquet = spin_reformat_output(tmp_path)
    rows = sources.read_rows(parquet)
    assert rows == sources.read_rows(SPIN_JSON) and len(rows) == 12
    assert all(row["generated"][1] == {"content": "", "role": "assistant"} for row in rows)
    examples, skipped = data.tokenize_rows(rows, tokenizer, **LENGTHS)
    assert skipped == 0
    for row, example in zip(rows, examples):
        question, answer = row["real"][0]["content"], row["real"][1]["content"]
        assert example.prompt_ids.tolist() == encode(tokenizer, f"<|bos|><|user|>\n{question}<|eos|>\n<|assistant|>\n")
        assert example.real_ids.tolist() == encode(tokenizer, answer) + [tokenizer.eos_token_id]
        assert example.generated_ids is None  # not generated yet: the loop's opponent generates it
    filled = dict(rows[0], generated=[rows[0]["real"][0], {"role": "assistant", "content": "Green."}])
    generated = data.tokenize_row(filled, tokenizer, **LENGTHS).generated_ids  # a filled one is read (not trained on)
    assert generated.tolist() == encode(tokenizer, "Green.") + [tokenizer.eos_token_id]
    user, empty = rows[0]["real"][0], {"role": "assistant", "content": ""}
    for bad, reason in (({"real": [user, empty], "generated": [user, empty]}, r"`real\[1\]` \(assistant\) has empty"),
                        ({"real": rows[0]["real"], "generated": [user, empty, user]},  # empty, and not the last turn
                         r"`generated\[1\]` \(assistant\) has empty")):
        with pytest.raises(data.DataError, match=reason):
            data.tokenize_row(bad, tokenizer, **LENGTHS)


def test_trl_rows_are_pairs_with_chosen_real_and_rejected_generated(tokenizer):
    question, good, bad = "What is 2 plus 2?", "2 plus 2 is 4.", "It is 5."
    user, turn = {"role": "user", "content": question}, lambda text: {"role": "assistant", "content": text}
    spin = data.tokenize_row({"real": [user, turn(good)], "generated": [user, turn(bad)]}, tokenizer, **LENGTHS)
    trl_rows = {
        "standard": {"prompt": question, "chosen": good, "rejected": bad},
        "conversational": {"prompt": [user], "chosen": [turn(good)], "rejected": [turn(bad)]},
        # implicit prompt; a string `prompt` beside conversations is ignored, as TRL does (ultrafeedback_binarized)
        "implicit": {"prompt": question, "chosen": [user, turn(good)], "rejected": [user, turn(bad)]},
    }
    for shape, row in trl_rows.items():
        example = data.tokenize_row(row, tokenizer, **LENGTHS)
        for field in ("prompt_ids", "real_ids", "generated_ids"):
            np.testing.assert_array_equal(getattr(example, field), getattr(spin, field), err_msg=f"{shape} {field}")
    assert data.tokenize_row({"prompt": question, "chosen": good, "rejected": ""}, tokenizer,
                             **LENGTHS).generated_ids is None
    for row, reason in (({"prompt": question, "chosen": good}, "needs both `chosen` and `rejected`"),
                        ({"chosen": good, "rejected": bad}, "needs its `prompt`"),
                        ({"prompt": question, "chosen": "", "rejected": bad}, "`chosen` is empty"),
                        ({"prompt": 3, "chosen": good, "rejected": bad}, "`prompt` must be a string or a list"),
                        ({"prompt": [user], "chosen": [user, turn(good)], "rejected": [turn(bad)]},
                         r"`chosen` must be one assistant turn \(TRL's conversational format\)"),
                        ({"chosen": [user, turn(good)], "rejected": [{**user, "content": "Hi?"}, turn(bad)]},
                         "different prompt turns")):
        with pytest.raises(data.DataError, match=reason):
            data.tokenize_row(row, tokenizer, **LENGTHS)


def test_spin_generation_prompt_is_made_for_generation_only(tokenizer):
    row = json.loads(SPIN_JSON.read_text())[1]
    chat = data.tokenize_row(row, tokenizer, **LENGTHS)
    spin = data.tokenize_row(row, tokenizer, **LENGTHS, prompt_format="spin")
    assert chat.generation_prompt_ids is None
    expected = encode(tokenizer, "### Instruction: How many legs does a spider have?\n\n### Response: ")
    assert spin.generation_prompt_ids.tolist() == expected and tokenizer.bos_token_id not in expected
    np.testing.assert_array_equal(spin.prompt_ids, chat.prompt_ids)  # training keeps the chat template
    cut = data.tokenize_row(row, tokenizer, max_length=16, max_prompt_length=8, prompt_format="spin")
    assert cut.generation_prompt_ids.tolist() == expected[-8:]
    system = {"role": "system", "content": "Be brief."}
    with pytest.raises(data.DataError, match=r"one user turn, and this row's prompt is \['system', 'user'\]"):
        data.tokenize_row({"messages": [system] + row["real"]}, tokenizer, **LENGTHS, prompt_format="spin")
    with pytest.raises(data.DataError, match="a token-id row"):
        data.tokenize_row({"prompt_ids": [5], "real_ids": [6]}, tokenizer, **LENGTHS, prompt_format="spin")


def test_prompt_format_spin_is_refused_with_space_unless_forced(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    text = ["data.source=rows.jsonl", "data.tokenizer=tok", "sampler.prompt_format=spin"]
    with pytest.raises(ConfigError) as error:
        config.load(empty, text)
    assert "sampler.prompt_format=spin" in str(error.value) and "loss.kind=space" in str(error.value)
    assert "sampler.force_prompt_format=true" in str(error.value) and "\n" not in str(error.value)
    assert config.load(empty, text + ["sampler.force_prompt_format=true"]).sampler.prompt_format == "spin"
    assert config.load(empty, text + ["loss.kind=spin"]).loss.kind == "spin"
    with pytest.raises(ConfigError, match="from_iteration entry '1: loss.kind=space'.*loss.kind=space"):
        config.load(empty, text + ["loss.kind=spin", "selfplay.from_iteration=['1: loss.kind=space']"])
    with pytest.raises(ConfigError, match="sampler.prompt_format and sampler.force_prompt_format are fixed"):
        config.load(empty, text[:2] + ["selfplay.from_iteration=['1: sampler.prompt_format=spin']", "loss.kind=spin"])
    with pytest.raises(ConfigError, match="data.source=toy has none"):
        config.load(empty, ["sampler.prompt_format=spin", "loss.kind=spin"])
    with pytest.raises(ConfigError, match="sampler.prompt_format must be one of"):
        config.load(empty, ["sampler.prompt_format=alpaca"])


# ----------------------------------------------------------------------------- row ids


def test_row_ids_pick_rows_by_position_or_by_a_field(tmp_path):
    rows = sources.read_rows(SPIN_JSON)
    assert sources.select_rows(rows, ROW_IDS, None, "spin") == LISTED
    chats = sources.read_rows(TINY_CHAT_PATH)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([chats[7]["prompt_id"], chats[3]["prompt_id"]]))
    assert sources.select_rows(chats, ids, "prompt_id", "chat") == [7, 3]
    cases = [("4\n\n# comment\n12\n", None, r"ids.txt: line 4: row 12 is not in spin, which has 12 rows"),
             ("4\nfour\n", None, r"ids.txt: line 2: 'four' is not a row position"),
             ("4\n5\n4\n", None, r"ids.txt: line 3 repeats the id 4 of its line 1"),
             ("# nothing\n", None, r"ids.txt lists no row ids"),
             ("abc\n", "prompt_id", r"no row of spin has a `prompt_id` field")]
    for text, field, reason in cases:
        (tmp_path / "ids.txt").write_text(text)
        with pytest.raises(sources.DataError, match=reason):
            sources.select_rows(rows, tmp_path / "ids.txt", field, "spin")
    ids.write_text(json.dumps([chats[7]["prompt_id"], "feed"]))
    with pytest.raises(sources.DataError, match=r"ids.json: entry 2: no row of chat has prompt_id = 'feed' \(1 of 2"):
        sources.select_rows(chats, ids, "prompt_id", "chat")
    with pytest.raises(FileNotFoundError, match="data.row_ids: .*nowhere.txt not found"):
        sources.select_rows(rows, tmp_path / "nowhere.txt", None, "spin")


def test_row_ids_need_held_out_rows_they_do_not_list(tmp_path):
    every = tmp_path / "every.txt"
    every.write_text("\n".join(map(str, range(12))))
    cfg = config.load(ROOT / "configs" / "tiny_chat_space.yaml",
                      [f"data.source={SPIN_JSON}", f"data.tokenizer={TINY_TOKENIZER_DIR}", f"data.row_ids={every}",
                       "data.num_train=0", "data.num_eval=4", "mesh.data=1", "train.batch_size=4",
                       "sampler.batch_size=4"])
    with pytest.raises(ConfigError, match=r"data.num_eval \(4\) needs 4 held-out rows that data.row_ids"):
        load_task(cfg)
    with pytest.raises(ConfigError, match="data.row_ids selects rows of a data file"):
        config.with_overrides(config.RunConfig(), [f"data.row_ids={every}"])


# ----------------------------------------------------------------------------- TRL's metrics


def test_trl_metric_names_have_trls_meaning():
    rng = np.random.default_rng(0)
    policy_real, opponent_real = rng.normal(-20, 3, 4).astype(np.float32), rng.normal(-20, 3, 4).astype(np.float32)
    policy_generated = rng.normal(-20, 3, (4, 2)).astype(np.float32)
    opponent_generated = rng.normal(-20, 3, (4, 2)).astype(np.float32)
    counts = dict(real_token_counts=np.array([3, 5, 8, 13], np.float32),
                  generated_token_counts=np.array([[2, 4], [6, 1], [9, 3], [7, 5]], np.float32))
    for kind, beta in (("spin", 0.1), ("dpo", 0.5), ("space", 2.0), ("ipo", 0.1)):
        _, got = losses.get_loss(kind)(policy_real, policy_generated, opponent_real, opponent_generated, beta=beta,
                                       **counts)
        # TRL's DPOTrainer: chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps), its
        # logps/chosen the policy's; IPO averages every log-prob over its tokens first.
        per = (counts["real_token_counts"], counts["generated_token_counts"]) if kind == "ipo" else (1.0, 1.0)
        chosen, rejected = np.float64(policy_real) / per[0], np.float64(policy_generated) / per[1]
        ref_chosen, ref_rejected = np.float64(opponent_real) / per[0], np.float64(opponent_generated) / per[1]
        expected = {"rewards/chosen": np.mean(beta * (chosen - ref_chosen)),
                    "rewards/rejected": np.mean(beta * (rejected - ref_rejected)),
                    "logps/chosen": np.mean(chosen), "logps/rejected": np.mean(rejected)}
        for name, value in expected.items():
            np.testing.assert_allclose(float(got[name]), value, rtol=1e-5, err_msg=f"{kind} {name}")
        # SPIN's rewards/real, rewards/margins (beta * r) are our _scaled ones; ours are the raw r
        margins = np.float64(policy_real - opponent_real)[:, None] - (policy_generated - opponent_generated)
        np.testing.assert_allclose(float(got["rewards/real_scaled"]), beta * np.mean(policy_real - opponent_real),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(got["rewards/margins_scaled"]), beta * np.mean(margins), rtol=1e-5)
        np.testing.assert_allclose(float(got["rewards/margins"]), np.mean(margins), rtol=1e-5)
    _, sft = losses.sft_loss(policy_real, policy_generated, opponent_real, opponent_generated)
    assert "logps/chosen" in sft and "rewards/chosen" not in sft  # no beta: no rewards
    _, real_only = losses.sft_loss.evaluate(losses.Scores(policy_real))
    assert "logps/chosen" not in real_only


# ----------------------------------------------------------------------------- init_from_revision


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tokenizer):
    """A Hugging Face cache holding one hub id, a random tiny Llama with the bundled tokenizer, at
    COMMIT (refs/main points at it), laid out as huggingface_hub lays out its cache."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--spin-test--tiny-llama"
    model_cfg = config.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    rng = np.random.default_rng(0)  # random weights made on the host: no compilation
    params = jax.tree.map(lambda leaf: rng.normal(0.0, 0.1, leaf.shape).astype(np.float32),
                          model.param_shapes(model_cfg))
    hf.save(model_cfg, params, repo / "snapshots" / COMMIT, tokenizer=tokenizer)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def hub(hub_cache, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache / "models--spin-test--tiny-llama" / "snapshots" / COMMIT


def test_init_from_revision_is_loaded_from_the_cache_or_checked(hub, tmp_path, caplog):
    assert hf.resolve_init_from(HUB_ID, COMMIT) == str(hub)
    assert hf.resolve_init_from(HUB_ID, "main") == str(hub) == hf.resolve_init_from(HUB_ID)
    assert hf.resolve_init_from(str(hub), COMMIT) == hf.resolve_init_from(str(hub), "main") == str(hub)
    assert hf.resolve_init_from(str(tmp_path)) == str(tmp_path) and hf.resolve_init_from(None) is None
    assert hf.resolve_init_from(str(tmp_path / "none")) == str(tmp_path / "none")  # not a hub id: left to the caller
    other = "f" * 40
    cases = [((HUB_ID, other), f"has no snapshot of the hub id at revision {other}; download it first "
                               f"\\(hf download {HUB_ID} --revision {other}\\)"),
             (("spin-test/absent", None), "no snapshot of the hub id at revision main"),
             ((str(hub), other), f"init_from_revision={other} is commit {other}, but init_from .* is the snapshot of "
                                 f"commit {COMMIT}"),
             ((str(hub), "v1"), "has no ref v1"),
             ((str(tmp_path), COMMIT), "is a directory, not a Hugging Face cache snapshot"),
             (("no/such", None), "is not a directory, and the Hugging Face cache .* has no snapshot")]
    for (init_from, revision), reason in cases:
        with pytest.raises(ConfigError, match=reason):
            hf.resolve_init_from(init_from, revision)
    with pytest.raises(ConfigError, match="init_from_revision is set but init_from is null"):
        config.with_overrides(config.RunConfig(), [f"init_from_revision={COMMIT}"])
    with caplog.at_level(logging.WARNING, logger="spacejax.selfplay.setup"):  # a branch can move: said once
        check_init_from(config.with_overrides(config.RunConfig(), [f"init_from={HUB_ID}", "init_from_revision=main"]))
    assert (f"is commit {COMMIT}; config.yaml records 'main', which can move: set init_from_revision={COMMIT}"
            in caplog.text)


# ----------------------------------------------------------------------------- end to end


def test_spin_reformat_output_trains_on_its_row_ids_from_a_pinned_hub_model(hub, tmp_path, caplog, monkeypatch):
    """SPIN's reformat parquet (empty `generated`), a fixed subset of its rows, SPIN's generation
    prompt and loss, from a hub id pinned at a commit: one self-play iteration."""
    source = spin_reformat_output(tmp_path)
    overrides = [f"init_from={HUB_ID}", f"init_from_revision={COMMIT}", "data.tokenizer=null",
                 f"data.source={source}", f"data.row_ids={ROW_IDS}", "data.num_train=0", "data.num_eval=4",
                 "mesh.data=1", "train.batch_size=4", "sampler.batch_size=4", "sampler.max_new_tokens=8",
                 "sampler.prompt_format=spin", "loss.kind=spin", "loss.beta=0.1", "selfplay.iterations=1",
                 "selfplay.sft_epochs=0", "train.epochs=1", "checkpoint.every_steps=100"]
    cfg = config.load(ROOT / "configs" / "tiny_chat_space.yaml", overrides)
    generated_from = []  # the prompts of every request the loop's generator answers
    answer = SamplerGenerator.generate

    def spy(self, params, requests, *args, **kwargs):
        generated_from.extend(r.prompt_ids.tolist() for r in requests)
        return answer(self, params, requests, *args, **kwargs)

    monkeypatch.setattr(SamplerGenerator, "generate", spy)
    workdir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        selfplay.run(cfg, workdir)
    assert not [r for r in caplog.records if "init_from" in r.getMessage()]  # pinned: no warning
    recorded = store.read_config(workdir / "config.yaml")
    assert (recorded.init_from, recorded.init_from_revision) == (HUB_ID, COMMIT)

    rows = json.loads(SPIN_JSON.read_text())
    tokenizer = hf.load_tokenizer(TINY_TOKENIZER_DIR)
    pairs = Pairs.load(workdir / "iter_000" / "samples.parquet")
    answers = lambda side: [tokenizer.decode(ids, skip_special_tokens=True) for ids in side.real_ids]  # noqa: E731
    assert answers(pairs.train) == [rows[i]["real"][1]["content"] for i in LISTED]  # the listed rows, in order
    position = {row["real"][1]["content"]: i for i, row in enumerate(rows)}
    held_out = [position[text] for text in answers(pairs.eval)]
    assert sorted(held_out) == [1, 4, 7, 10]
    assert all(len(g) == 1 and len(g[0]) > 0 for g in pairs.generated_ids)  # the loop generated each
    # ... from SPIN's prompts, while the pairs keep the chat-template prompts they are trained under
    questions = [rows[i]["real"][0]["content"] for i in LISTED + held_out]
    assert [tokenizer.decode(p) for p in generated_from] == [
        f"### Instruction: {q}\n\n### Response: " for q in questions]
    assert [tokenizer.decode(p) for p in pairs.prompt_ids] == [
        f"<|bos|><|user|>\n{q}<|eos|>\n<|assistant|>\n" for q in questions]

    steps = [r for r in metrics.read(workdir) if "event" not in r and r["iteration"] == 0]
    assert len(steps) == 2 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # SPIN at theta = theta_t
    for record in steps:
        assert record["rewards/chosen"] == pytest.approx(0.1 * record["rewards/real"], rel=1e-4, abs=1e-7)
        assert record["logps/rejected"] == pytest.approx(record["logps/generated"], rel=1e-6)
    assert (workdir / "iter_000" / "DONE").exists()
