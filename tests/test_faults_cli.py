"""Fault injection at the command line: bad input gets one line naming the file (or flag) and what to
do, exit status 2 and no traceback (unless --debug); outputs are checked before any work and never
overwrite an input or mix with other files; a model directory's own code is never run."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spacejax import checkpoint, cli, data, hf, plan, sources
from spacejax.assets import TINY_TOKENIZER_DIR

import hf_models

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_space.yaml")
TINY_CHAT = str(ROOT / "configs" / "tiny_chat_space.yaml")
ZEPHYR = str(ROOT / "configs" / "zephyr7b_space.yaml")
PLAN = ["plan", "--config", ZEPHYR, "--devices", "8", "--hbm-gib", "95"]


def error_line(capsys, command: str) -> str:
    """The one error line the CLI printed for `command` (log lines aside); no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"spacejax {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama (vocabulary 320) saved by transformers, without a tokenizer."""
    directory = tmp_path_factory.mktemp("hf") / "model"
    hf_models.save("llama_tied", directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_dir):
    directory = tmp_path_factory.mktemp("ckpt") / "params"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(directory)]) == 0
    return directory


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1, 5, 9]}) + "\n")
    return path


def copy_of(directory: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(directory, tmp_path / name))


# ----------------------------------------------------------------------------------- convert --out


def test_convert_to_hf_refuses_a_directory_holding_other_files(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["convert", "--to-hf", str(ckpt), "--out", str(out)]) == 2
    line = error_line(capsys, "convert")
    assert str(out) in line and "not empty" in line
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder: refused before any work


def test_convert_to_hf_over_earlier_exports_leaves_no_stale_shards(ckpt, tmp_path):
    out = tmp_path / "export"
    hf_models.build("llama_tied").save_pretrained(out, max_shard_size="100KB")  # transformers' shards, no manifest
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    shard_sets = []
    for shard_bytes in (None, 40_000, 150_000, None):  # one file, many shards, fewer shards, one file
        extra = ["--max-shard-gib", str(shard_bytes / 2**30)] if shard_bytes else []
        assert cli.main(["convert", "--to-hf", str(ckpt), "--out", str(out), *extra]) == 0
        weights = sorted(name for name in os.listdir(out) if name.startswith("model"))
        if shard_bytes:
            index = json.loads((out / hf.INDEX_FILE).read_text())
            assert weights == sorted({*index["weight_map"].values(), hf.INDEX_FILE})
        else:
            assert weights == [hf.SINGLE_FILE]
        shard_sets.append(weights)
    assert len(shard_sets[1]) > len(shard_sets[2]) > 2
    cfg, params = hf.load(out)
    assert cfg.num_layers == hf_models.COMMON["num_hidden_layers"]


def test_convert_to_hf_redoes_an_export_cut_short(ckpt, tmp_path):
    """An export killed while it replaced an earlier one (config.json, removed first, and some shards gone)
    is an earlier export, not a stranger's directory: the same command completes it."""
    out = tmp_path / "export"
    shards = ["--max-shard-gib", str(40_000 / 2**30)]
    assert cli.main(["convert", "--to-hf", str(ckpt), "--out", str(out), *shards]) == 0
    (out / "config.json").unlink()
    for shard in sorted(out.glob(hf.SHARD_PATTERN))[:3]:
        shard.unlink()
    assert cli.main(["convert", "--to-hf", str(ckpt), "--out", str(out), *shards]) == 0
    assert hf.load(out)[0] == checkpoint.load_config(ckpt)


def test_convert_from_hf_checks_out_before_loading(ckpt, tmp_path, capsys):
    nowhere = str(tmp_path / "no_model")  # never read: --out is refused first
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["convert", "--from-hf", nowhere, "--out", str(out)]) == 2
    line = error_line(capsys, "convert")
    assert str(out) in line and "not empty" in line and "no_model" not in line
    assert cli.main(["convert", "--from-hf", nowhere, "--out", str(ckpt)]) == 2
    line = error_line(capsys, "convert")
    assert f"{ckpt} already holds a checkpoint; choose another directory or delete it" in line


# ----------------------------------------------------------------------------------- generate --out


def test_generate_refuses_out_equal_to_prompts_however_spelled(tmp_path, prompts, capsys, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.jsonl").symlink_to(prompts)
    monkeypatch.chdir(tmp_path)
    before = prompts.read_bytes()
    for out in (str(prompts), str(tmp_path / "sub" / ".." / "prompts.jsonl"), "prompts.jsonl",
                str(tmp_path / "link.jsonl")):
        # the model does not exist: the refusal comes before it is looked at
        assert cli.main(["generate", "--model", "no_model", "--prompts", str(prompts), "--out", out]) == 2
        line = error_line(capsys, "generate")
        assert f"--out {out} is the --prompts file" in line
    assert prompts.read_bytes() == before


def test_generate_and_bench_throughput_refuse_a_directory_out_before_any_work(tmp_path, prompts, capsys):
    out = tmp_path / "outputs"
    out.mkdir()
    assert cli.main(["generate", "--model", "no_model", "--prompts", str(prompts), "--out", str(out)]) == 2
    assert f"--out {out} is a directory" in error_line(capsys, "generate")
    assert cli.main(["bench", "throughput", "--out", str(out)]) == 2  # would write its JSON after minutes of timing
    assert f"--out {out} is a directory" in error_line(capsys, "bench")


def test_generate_refuses_an_out_whose_folder_cannot_be_made(tmp_path, prompts, capsys):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "sub" / "completions.jsonl"
    assert cli.main(["generate", "--model", "no_model", "--prompts", str(prompts), "--out", str(out)]) == 2
    line = error_line(capsys, "generate")
    assert f"{tmp_path / 'a_file'}: Not a directory" in line


# ----------------------------------------------------------------------------------- damaged models


def _not_json(directory: Path) -> Path:
    (directory / "config.json").write_text('{"model_type": "llama", ')
    return directory / "config.json"


def _a_list(directory: Path) -> Path:
    (directory / "config.json").write_text("[1, 2]")
    return directory / "config.json"


def _config_without(key: str):
    def damage(directory: Path) -> Path:
        values = json.loads((directory / "config.json").read_text())
        del values[key]
        (directory / "config.json").write_text(json.dumps(values))
        return directory / "config.json"
    return damage


def _a_string_size(directory: Path) -> Path:
    values = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**values, "num_hidden_layers": "2"}))
    return directory / "config.json"


def _truncated(size):
    def damage(directory: Path) -> Path:
        file = directory / hf.SINGLE_FILE
        content = file.read_bytes()
        file.write_bytes(content[:size(len(content))])
        return file
    return damage


DAMAGES = {"config.json not JSON": (_not_json, "is not valid JSON"),
           "config.json a list": (_a_list, "must hold a JSON object"),
           "config.json without hidden_size": (_config_without("hidden_size"), "lacks hidden_size"),
           "config.json with a string size": (_a_string_size, "num_hidden_layers"),
           "safetensors cut in half": (_truncated(lambda n: n // 2), "not a readable safetensors file"),
           "safetensors cut in its header": (_truncated(lambda n: 5), "not a readable safetensors file")}


@pytest.mark.parametrize("command", ["convert", "generate"])
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_model_directory_is_one_line_naming_the_file(hf_dir, tmp_path, prompts, capsys, command, damage):
    model = copy_of(hf_dir, tmp_path, "model")
    make_damage, problem = DAMAGES[damage]
    file = make_damage(model)
    if command == "convert":
        argv = ["convert", "--from-hf", str(model), "--out", str(tmp_path / "ckpt")]
    else:
        argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "out.jsonl"),
                "--max-new-tokens", "2"]
    assert cli.main(argv) == 2
    line = error_line(capsys, command)
    assert str(file) in line and problem in line
    assert "again" in line or "fix" in line  # what to do


# ----------------------------------------------------------------------------------- OS errors


def test_a_workdir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "a_file" / "run")]) == 2
    line = error_line(capsys, "train")
    assert str(tmp_path / "a_file") in line and "Not a directory" in line


READ_ONLY_PROBE = """
import sys
from spacejax import cli
locked = sys.argv[1]
codes = [cli.main(["train", "--config", sys.argv[2], "--workdir", locked + "/run"]),
         cli.main(["generate", "--model", "no_model", "--prompts", sys.argv[3], "--out", locked + "/out.jsonl"])]
print("codes", *codes)
"""


def test_a_read_only_workdir_and_out_folder_are_one_line_naming_the_path(tmp_path, prompts):
    """chmod 555 stops writes unless the process may override file permissions (root): then the
    probe runs as root without CAP_DAC_OVERRIDE (setpriv), for which the mode bits hold too."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root, where chmod 555 does not stop writes, and setpriv (util-linux) "
                        "is missing to drop the capability that lets root write anyway")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = subprocess.run([*prefix, sys.executable, "-c", READ_ONLY_PROBE, str(locked), TINY, str(prompts)],
                                capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        locked.chmod(0o755)
    assert "codes 2 2" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("spacejax train: error: ") and errors[1].startswith("spacejax generate: error: ")
    for line in errors:
        assert str(locked) in line and "Permission denied" in line
    assert errors[1].endswith(f"{locked}: Permission denied; check its permissions, or choose another path")
    assert os.listdir(locked) == []


# ----------------------------------------------------------------------------------- chat templates


def tokenizer_with_template(tmp_path: Path, template: str, name: str = "tokenizer") -> Path:
    directory = copy_of(TINY_TOKENIZER_DIR, tmp_path, name)
    (directory / "chat_template.jinja").write_text(template)
    return directory


@pytest.mark.parametrize("template, problem", [
    ("{{ messages.__class__.__mro__ }}", "does what jinja's sandbox refuses: access to attribute '__class__'"),
    ("{% for m in messages %}{{ m['content'] }}", "has a syntax error at its line 1"),
])
def test_a_chat_template_that_cannot_render_is_one_line_naming_the_tokenizer(
        hf_dir, tmp_path, prompts, capsys, template, problem):
    tokenizer = tokenizer_with_template(tmp_path, template)
    argv = ["generate", "--model", str(hf_dir), "--tokenizer", str(tokenizer), "--prompts", str(prompts),
            "--out", str(tmp_path / "out.jsonl")]
    assert cli.main(argv) == 2
    line = error_line(capsys, "generate")
    assert f"{tokenizer}: the chat template {problem}" in line
    assert not (tmp_path / "out.jsonl").exists()


def test_a_template_failing_on_some_turns_names_the_tokenizer_or_the_row(tmp_path):
    """A sandbox refusal met only on a system turn (past the load-time check) is the tokenizer's fault;
    the template's own raise_exception is the row's, with its line and the skip hint."""
    refuses_system = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m.__class__.__mro__ }}"
                      "{% elif m['role'] == 'user' and m['content'] == 'Forbidden?' %}{{ raise_exception('no') }}"
                      "{% endif %}{{ m['content'] }}{% endfor %}")
    tokenizer = hf.load_tokenizer(tokenizer_with_template(tmp_path, refuses_system))
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    system = {"messages": [{"role": "system", "content": "Be brief."}, *good["messages"]]}
    forbidden = {"messages": [{"role": "user", "content": "Forbidden?"}, good["messages"][1]]}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(system) + "\n")
    with pytest.raises(ValueError, match="the chat template does what jinja's sandbox refuses") as info:
        data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32, skip_bad_rows=True)
    assert not isinstance(info.value, data.DataError) and str(tmp_path / "tokenizer") in str(info.value)
    path.write_text(json.dumps(good) + "\n" + json.dumps(forbidden) + "\n")
    with pytest.raises(data.DataError, match=r"rows.jsonl: line 2: the chat template refuses the prompt turns \(no\)"):
        data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32)


# ----------------------------------------------------------------------------------- plan numbers


@pytest.mark.parametrize("flag, value", [("--devices", "0"), ("--devices", "-4"), ("--hbm-gib", "0"),
                                         ("--hbm-gib", "-95"), ("--hbm-gib", "nan"), ("--hbm-gib", "inf")])
def test_plan_refuses_impossible_topologies(capsys, flag, value):
    argv = list(PLAN)
    argv[argv.index(flag) + 1] = value
    assert cli.main(argv) == 2
    line = error_line(capsys, "plan")
    assert line.startswith(f"spacejax plan: error: {flag} {value}")


# ----------------------------------------------------------------------------------- remote code


MARKER_CODE = "open({marker!r}, 'w').write('ran')\n"


def with_remote_code(directory: Path, config_name: str, marker: Path) -> None:
    """Point `config_name`'s auto_map at a Python file of the directory that leaves `marker` if run."""
    values = json.loads((directory / config_name).read_text())
    values["auto_map"] = {"AutoConfig": "remote.Config", "AutoModelForCausalLM": "remote.Model",
                          "AutoTokenizer": ["remote.Tokenizer", None]}
    (directory / config_name).write_text(json.dumps(values))
    (directory / "remote.py").write_text(MARKER_CODE.format(marker=str(marker)))


def test_a_model_needing_its_own_code_is_refused(hf_dir, tmp_path, prompts, capsys):
    model = copy_of(hf_dir, tmp_path, "model")
    marker = tmp_path / "remote_code_ran"
    with_remote_code(model, "config.json", marker)
    for argv in (["convert", "--from-hf", str(model), "--out", str(tmp_path / "ckpt")],
                 ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl")]):
        assert cli.main(argv) == 2
        line = error_line(capsys, argv[0])
        assert f"{model / 'config.json'} has an auto_map" in line
        assert "spacejax never runs a model directory's own code" in line
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


def test_a_tokenizer_needing_its_own_code_is_refused(hf_dir, tmp_path, prompts, capsys):
    tokenizer = copy_of(TINY_TOKENIZER_DIR, tmp_path, "tokenizer")
    marker = tmp_path / "remote_code_ran"
    with_remote_code(tokenizer, "tokenizer_config.json", marker)
    argv = ["generate", "--model", str(hf_dir), "--tokenizer", str(tokenizer), "--prompts", str(prompts),
            "--out", str(tmp_path / "o.jsonl")]
    assert cli.main(argv) == 2
    line = error_line(capsys, "generate")
    assert f"{tokenizer / 'tokenizer_config.json'} has an auto_map" in line
    assert "spacejax never runs a model directory's own code" in line
    assert not marker.exists()


def test_trust_remote_code_is_never_true():
    """Every transformers Auto* loader called in spacejax passes trust_remote_code=False; no call passes
    anything else for it."""
    loaders = 0
    for file in (ROOT / "spacejax").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            trust = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
            assert all(isinstance(v, ast.Constant) and v.value is False for v in trust), (file, node.lineno)
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr.startswith("from_") and ast.unparse(
                    func.value).split(".")[-1].startswith("Auto"):
                assert trust, f"{file}:{node.lineno} calls {ast.unparse(func)} without trust_remote_code=False"
                loaders += 1
    assert loaders >= 1


# ----------------------------------------------------------------------------------- data errors


def chat(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "Yes."}]}


BAD_ROW = {"messages": [{"role": "user", "content": "Only a question?"}]}


def test_a_jsonl_data_error_names_the_line_an_editor_shows(tmp_path):
    tokenizer = hf.load_tokenizer(TINY_TOKENIZER_DIR)
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([json.dumps(chat("A?")), "", json.dumps(chat("B?")), "   ", json.dumps(BAD_ROW),
                               json.dumps(chat("C?"))]) + "\n")
    with pytest.raises(data.DataError) as info:
        data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32)
    message = str(info.value)
    assert f"{path}: line 5: `messages` has no assistant turn" in message
    assert "set data.skip_bad_rows=true to skip bad rows" in message
    assert path.read_text().splitlines()[4] == json.dumps(BAD_ROW)


def test_a_parquet_data_error_names_the_row_counting_from_zero(tmp_path, caplog):
    tokenizer = hf.load_tokenizer(TINY_TOKENIZER_DIR)
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist([chat("A?"), chat("B?"), BAD_ROW]), path)
    with pytest.raises(data.DataError, match=r"chats.parquet: row 2 \(counting from 0\): `messages` has no "
                                             r"assistant turn.*data.skip_bad_rows=true"):
        data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32)
    examples, skipped = data.load_examples(path, tokenizer, max_length=64, max_prompt_length=32, skip_bad_rows=True)
    assert (len(examples), skipped) == (2, 1)
    assert "first: row 2 (counting from 0)" in caplog.text
    assert sources.where(sources.read_rows(path), 2) == "row 2 (counting from 0)"


def test_train_names_the_bad_rows_line(tmp_path, capsys):
    rows = [line for line in (ROOT / "spacejax" / "assets" / "tiny_chat.jsonl").read_text().splitlines()[:40]]
    rows[7:7] = ["", json.dumps(BAD_ROW)]  # the bad row is line 9
    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join(rows) + "\n")
    argv = ["train", "--config", TINY_CHAT, "--workdir", str(tmp_path / "run"), f"data.source={source}",
            f"data.tokenizer={TINY_TOKENIZER_DIR}", "data.num_train=16", "data.num_eval=8"]
    assert cli.main(argv) == 2
    line = error_line(capsys, "train")
    assert f"{source}: line 9: `messages` has no assistant turn" in line and "data.skip_bad_rows=true" in line


# ----------------------------------------------------------------------------------- parsing


def test_overrides_on_both_sides_of_options_are_all_taken(tmp_path):
    w = str(tmp_path / "w")
    cases = {
        ("train", "--config", TINY, "a=1", "--workdir", w, "b=2"): ("train", None),
        ("plan", "--config", ZEPHYR, "a=1", "--devices", "8", "b=2", "--hbm-gib", "95", "c=3"): ("plan", None),
        ("bench", "stability", "--config", TINY, "a=1", "--out", w, "b=2", "--seeds", "1"): ("bench", "stability"),
        ("bench", "throughput", "a=1", "--out", w, "b=2", "--repeats", "1"): ("bench", "throughput"),
    }
    for argv, (command, benchmark) in cases.items():
        args = cli.parse_args(list(argv))
        assert args.command == command and getattr(args, "benchmark", None) == benchmark
        assert args.overrides == [arg for arg in argv if "=" in arg], argv
        assert args.debug is False


def test_an_override_after_an_option_reaches_the_config(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", TINY, "data.num_train=64", "--workdir", str(workdir), "nosuch.key=1"]) == 2
    assert "unknown key nosuch" in error_line(capsys, "train")
    assert not workdir.exists()
    assert cli.main(["bench", "throughput", "model.num_layers=1", "--out", str(tmp_path / "t.json"),
                     "--repeats", "1", "train.nosuch=1"]) == 2
    assert "unknown key train.nosuch" in error_line(capsys, "bench")
    code = cli.main(["plan", "--config", ZEPHYR, "model.num_layers=2", "--devices", "8", "model.vocab_size=1000",
                     "--hbm-gib", "95"])
    out = capsys.readouterr().out
    assert code == 0 and "2 layers' saved" in out and ", 1000] " in out


def test_help_and_usage_errors_still_come_from_argparse(capsys):
    for argv, expected in ((["--help"], "{convert,train,generate,answer,eval,plan,bench,plot}"), (["train", "--help"], "--workdir"),
                           (["bench", "throughput", "--help"], "--sampler-batches")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0 and expected in capsys.readouterr().out
    for argv, expected in ((["train", "--config", TINY, "--workdir", "w", "--bogus"],
                            "unrecognized arguments: --bogus"),
                           (["--bogus", *PLAN], "unrecognized arguments: --bogus"),
                           (["plan", "--config", ZEPHYR, "--devices", "8"], "required: --hbm-gib")):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2 and expected in capsys.readouterr().err


# ----------------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_before_or_after_the_command(capsys):
    bad = [*PLAN[:-1], "0"]  # --hbm-gib 0
    assert cli.main(bad) == 2
    for argv in (["--debug", *bad], [*bad, "--debug"], [bad[0], "--debug", *bad[1:]]):
        with pytest.raises(ValueError, match="--hbm-gib 0: the memory per device must be a positive number"):
            cli.main(argv)


def test_an_unexpected_error_keeps_its_traceback(monkeypatch):
    """Only bad input is one line: a bug (here a KeyError inside the planner) is not hidden."""
    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(plan, "make_plan", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(PLAN)
