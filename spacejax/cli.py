"""Command line: `spacejax convert | generate | answer | ...`. The only module that knows about argv."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import sys

import jax
import jinja2
import yaml
from absl import logging as absl_logging
from safetensors import SafetensorError

from spacejax import bench, checkpoint, config, hf, metrics, model_dir, plan, sampler, selfplay, sharding, storage
from spacejax.eval import answers


def convert(args: argparse.Namespace) -> None:
    """Hugging Face directory <-> spacejax params checkpoint (either side local or gs://)."""
    storage.check_usable(args.out)
    out = storage.location(args.out)
    if args.from_hf:
        if checkpoint.is_params_checkpoint(out):
            raise FileExistsError(f"{out} already holds a checkpoint; choose another directory or delete it")
        _check_out_dir(out)
        overrides = {"param_dtype": args.param_dtype} if args.param_dtype else {}
        cfg, params = hf.load(args.from_hf, **overrides)
        checkpoint.save_params(out, cfg, params)
    else:
        _check_out_dir(out, "Hugging Face export (config.json and safetensors)", earlier=hf.is_export(out))
        cfg, params = checkpoint.load_params(args.to_hf)
        hf.save(cfg, params, out, max_shard_bytes=int(args.max_shard_gib * 2**30))  # replaces an earlier export whole
    print(f"wrote {out}")


def _check_out_dir(out, replaceable: str = "", earlier: bool = False) -> None:
    """Before any work: --out DIR must be new or empty, or hold (`earlier`) an earlier output of
    the `replaceable` kind, which the new one replaces; anything else is refused, so that no other
    file is overwritten or mixed in."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a directory")
    if out.exists() and not earlier and any(out.iterdir()):
        holds = f" and holds no earlier {replaceable}" if replaceable else ""
        raise FileExistsError(f"--out {out} is not empty{holds}; choose a new or empty directory")


def train(args: argparse.Namespace) -> int:
    """Run, or resume, the self-play loop of a config in a workdir; exit status PREEMPTED_EXIT (75)
    when it stopped on SIGTERM with everything saved: re-running the same command resumes."""
    cfg = config.load(args.config, args.overrides)
    storage.check_usable(args.workdir)
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        evaluation = selfplay.run(cfg, args.workdir)
    except selfplay.Preempted as stop:
        print(f"spacejax train: {stop} (exit status {selfplay.PREEMPTED_EXIT})")
        return selfplay.PREEMPTED_EXIT
    summary = ", ".join(f"{k}={v:.4g}" for k, v in evaluation.items() if k in SUMMARY_KEYS)
    print(f"done: {args.workdir} ({summary}); curves in {metrics.log_path(args.workdir)}")


SUMMARY_KEYS = ("eval/kl", "eval/reverse_kl", "eval/nll_per_token", "eval/loss_start", "eval/loss_end")


def generate(args: argparse.Namespace) -> None:
    """Sample completions for the prompts of a JSONL file; see `sampler.read_prompts` for rows."""
    _check_out_file(args.out, inputs={"--prompts": args.prompts})
    cfg, tokenizer, load_params = model_dir.open_model(args.model, args.tokenizer)
    sampling = sampler.Sampling(args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    rows, prompts = sampler.read_prompts(args.prompts, tokenizer, vocab_size=cfg.vocab_size)  # fail early

    cfg, params = load_params()
    completions = sampler.generate(
        cfg, params, prompts, args.seed, sampling, max_new_tokens=args.max_new_tokens,
        end_ids=model_dir.end_ids(cfg, tokenizer), batch_size=args.batch_size, num_samples=args.num_samples)
    sampler.write_jsonl_atomic(args.out, sampler.completion_rows(rows, completions, args.num_samples, tokenizer))
    print(f"wrote {len(completions)} completions of {len(rows)} prompts to {args.out}")


def answer(args: argparse.Namespace) -> None:
    """A model's answers to a judge-based benchmark's questions, in the file its judge reads; see
    `spacejax.eval.answers` for the formats, the prompts and the sampling settings."""
    inputs = {"--questions": args.questions, **({"--config": args.config} if args.config else {})}
    _check_out_file(args.out, inputs=inputs)
    answers.check_out(args.out, args.format)
    run_cfg = _run_config(args.config) if args.config else None
    settings = answers.settings(run_cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    cfg, tokenizer, load_params = model_dir.open_model(args.model, args.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {args.model} holds no tokenizer ({', '.join(model_dir.TOKENIZER_FILES)}) and no "
                                "--tokenizer was given; the questions are text: pass --tokenizer DIR")
    questions = answers.read_questions(args.questions, args.format)
    for question in questions:  # fail early: every first turn renders and fits
        answers.turn_prompt(tokenizer, question, [], cfg.max_position_embeddings)

    cfg, params = load_params()
    replies = answers.answer(cfg, params, tokenizer, questions, settings, end_ids=model_dir.end_ids(cfg, tokenizer))
    model_id = args.model_id or storage.location(args.model).name
    answers.write(args.out, args.format, answers.answer_rows(args.format, questions, replies, model_id))
    print(f"wrote the {args.format} answers of {model_id} to {len(questions)} questions "
          f"({sum(map(len, replies))} turns) to {args.out}")


def evaluate(args: argparse.Namespace) -> None:
    """lm-eval's tasks on a model, through lm-eval's own evaluator on the `spacejax` backend; its
    files (results, and samples with --log-samples) under --output-path, written by process 0."""
    try:
        from spacejax.eval import harness
    except ImportError as missing:  # the lm_eval extra is not installed: say how to install it
        raise ValueError(str(missing)) from None
    storage.check_usable(args.output_path)
    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    model_args = {"path": args.model, "batch_size": args.batch_size, "seed": args.seed,
                  **({"tokenizer": args.tokenizer} if args.tokenizer else {}),
                  **({"max_length": args.max_length} if args.max_length else {})}
    results = harness.evaluate("spacejax", args.tasks, model_args=model_args, num_fewshot=args.num_fewshot,
                               limit=args.limit, include_path=args.include_path, log_samples=args.log_samples,
                               apply_chat_template=args.apply_chat_template, output_path=args.output_path,
                               random_seed=args.seed)
    if jax.process_index() == 0:
        from lm_eval.utils import make_table

        print(make_table(results))
        print(f"wrote lm-eval's results{' and samples' if args.log_samples else ''} under {args.output_path}")


def _run_config(path) -> config.RunConfig:
    """--config: a run config YAML file, or a run's workdir (its config.yaml)."""
    location = storage.location(path)
    return config.load(location / selfplay.CONFIG_FILE if location.is_dir() else location)


def _check_out_file(out, inputs: dict[str, str]) -> None:
    """Before any work: the file --out will be written (atomically, replacing it) is none of
    `inputs` ({flag: path}, however spelled), not a directory, and its folder can be made and
    written (locally; a gs:// bucket through `storage.check_usable`)."""
    storage.check_usable(out)
    target = storage.location(out)
    for flag, path in inputs.items():
        if _same_file(target, storage.location(path)):
            raise ValueError(f"--out {out} is the {flag} file; write the output to another file")
    if target.is_dir():
        raise IsADirectoryError(f"--out {target} is a directory; give the path of a file to write")
    if not storage.is_remote(target):
        folder = os.path.dirname(os.fspath(target))
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)


def _same_file(a, b) -> bool:
    """Whether two locations name one file: the same URL, or local paths equal once symlinks and
    `..` are resolved (or the same inode: a hard link)."""
    if storage.is_remote(a) or storage.is_remote(b):
        return os.fspath(a) == os.fspath(b)
    a, b = os.fspath(a), os.fspath(b)
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def plan_memory(args: argparse.Namespace) -> int:
    """Per-device memory of a config on N devices; exit status 1 when it does not fit."""
    estimate = plan.make_plan(config.load(args.config, args.overrides), args.devices, args.hbm_gib)
    print(plan.format_plan(estimate))
    return 0 if estimate.fits else 1


def bench_stability(args: argparse.Namespace) -> None:
    """SPIN, SPACE and SFT from a shared theta_0 over seeds and theta_0 regimes: curves.json/csv,
    plots, summary.md."""
    def listed(groups):
        return [m for group in groups for m in group.split(",") if m] if groups else None

    if args.compilation_cache != "none" and not jax.config.jax_compilation_cache_dir:
        # every run of the benchmark compiles the same programs: each compiles once (halves a run's time)
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache or os.path.join(args.out, "jax_cache"))
    bench.stability(args.config, args.out, seeds=args.seeds, methods=listed(args.methods) or bench.DEFAULT_METHODS,
                    overrides=args.overrides, first_seed=args.first_seed, theta0=args.theta0,
                    theta0_methods=listed(args.theta0_methods))
    print(f"wrote {args.out}/curves.json, curves.csv, kl.png, steps.png, summary.md")


def bench_throughput(args: argparse.Namespace) -> None:
    """Tokens/s, MFU and roofline fractions of the train step, scoring and the sampler: a JSON file."""
    run_cfg = config.load(args.config or bench.throughput.DEFAULT_CONFIG, args.overrides)
    _check_out_file(args.out, inputs={"--config": args.config or bench.throughput.DEFAULT_CONFIG})
    command = shlex.join(["spacejax", "bench", "throughput", "--out", str(args.out), *(
        ["--config", str(args.config)] if args.config else []),
        "--sampler-batches", ",".join(map(str, args.sampler_batches)), "--repeats", str(args.repeats),
        "--matmul-size", str(args.matmul_size), "--bandwidth-bytes", str(args.bandwidth_bytes), *(
            ["--profile", str(args.profile)] if args.profile else []), *args.overrides])
    result = bench.throughput.run(run_cfg, args.out, sampler_batches=args.sampler_batches, repeats=args.repeats,
                                  matmul_size=args.matmul_size, bandwidth_bytes=args.bandwidth_bytes,
                                  profile_dir=args.profile, command=command)
    print(bench.throughput.format_table(result))
    print(f"wrote {args.out}")


def plot_runs(args: argparse.Namespace) -> None:
    """The stability plots (and curves, summary) of any run directories."""
    written = bench.plot_workdirs(args.workdirs, args.out)
    print(f"wrote {', '.join(str(p) for p in written)}")


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


def _multiples(text: str) -> tuple[int, ...]:
    """`1x,4x` (or `1,4`) -> (1, 4)."""
    try:
        return tuple(int(part.strip().removesuffix("x")) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole multiples of N, like 1x,4x") from None


def parse_args(argv=None) -> argparse.Namespace:
    """argv -> the parsed arguments of one command, whose overrides may stand on both sides of its
    options (`train --config C a=1 --workdir W b=2`). The whole parser finds the command (and a
    bench's benchmark) and answers --help and usage errors; the command's own parser then reads its
    arguments with `parse_intermixed_args`, which argparse refuses on a parser with subparsers."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    found, unknown = parser.parse_known_args(argv)
    command, rest = parser, argv
    names = (found.command, found.benchmark) if found.command == "bench" else (found.command,)
    for name in names:
        # no option before a command name takes a value: the command is the first non-option
        at = next(i for i, arg in enumerate(rest) if not arg.startswith("-"))
        stray = [arg for arg in rest[:at] if arg in unknown]
        if stray:
            command.error(f"unrecognized arguments: {' '.join(stray)}")
        command, rest = _subcommands(command).choices[name], rest[at + 1:]
    top = dict(zip(("command", "benchmark"), names), debug=found.debug)
    return command.parse_intermixed_args(rest, argparse.Namespace(**top))


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spacejax", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also after the command)")
    # --debug after the command too; unless given there, the top-level value stands
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    # the commands that run on several processes off TPU (on TPU, jax finds the pod itself)
    processes = argparse.ArgumentParser(add_help=False)
    processes.add_argument("--coordinator", metavar="HOST:PORT",
                           help="multi-process run off TPU: jax.distributed coordinator (process 0's address)")
    processes.add_argument("--num-processes", type=int, help="with --coordinator: how many processes")
    processes.add_argument("--process-id", type=int, help="with --coordinator: this process's index")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="Hugging Face checkpoint <-> spacejax params checkpoint", parents=[debug])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="a local Hugging Face model directory")
    source.add_argument("--to-hf", metavar="CKPT_DIR", help="a spacejax params checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"],
                   help="with --from-hf: dtype of the stored params (default float32)")
    p.add_argument("--max-shard-gib", type=float, default=5.0,
                   help="with --to-hf: split safetensors files above this size (GiB)")
    p.set_defaults(run=convert)

    p = commands.add_parser("train", help="self-play fine-tuning; re-running the same command resumes",
                            parents=[debug, processes])
    p.add_argument("--config", required=True, help="a YAML file of configs/")
    p.add_argument("--workdir", required=True, help="the run directory (config, metrics, checkpoints)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.set_defaults(run=train)

    p = commands.add_parser(
        "generate", help="sample completions for a JSONL file of prompts", parents=[debug],
        description="Rows of --prompts carry `prompt_ids` (token ids; no tokenizer needed), `messages` "
                    "(chat turns, rendered with the chat template and the generation prompt) or `prompt` "
                    "(text, rendered as a single user turn when the tokenizer has a chat template). "
                    "Each output row is its input row plus `sample_index`, `completion_ids` (the end id "
                    "included), `finished` and, with a tokenizer, `completion`. Generation stops at the "
                    "model's eos ids and the tokenizer's eos.")
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a spacejax params checkpoint")
    p.add_argument("--prompts", required=True, help="JSONL file, one prompt per line")
    p.add_argument("--out", required=True, help="JSONL file to write (atomically)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model, when it holds one)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 switches top-k off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 switches top-p off")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="rows generated together")
    p.set_defaults(run=generate)

    p = commands.add_parser(
        "answer", help="a model's answers to MT-Bench or AlpacaEval questions, in the file their judge reads",
        parents=[debug],
        description="Answers every question of --questions (MT-Bench: every turn, each asked after the model's "
                    "own earlier answers) with the tokenizer's chat template, and writes them as FastChat's "
                    "MT-Bench judge (model_answer/<model>.jsonl) or AlpacaEval (a .json list) reads them; no "
                    "judge is called. Sampling: each flag given, else --config's sampler section and seed, else "
                    "temperature 0.7, top-k and top-p off, 1024 new tokens, seed 0. Without --temperature an "
                    "MT-Bench question of a category in FastChat's temperature table takes its temperature.")
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a spacejax params checkpoint")
    p.add_argument("--questions", required=True, help="mt_bench: question.jsonl; alpaca_eval: a .json list "
                                                       "(alpaca_eval.json), .jsonl or .parquet file")
    p.add_argument("--format", required=True, choices=answers.FORMATS)
    p.add_argument("--out", required=True, help="the answer file to write (atomically): .jsonl for mt_bench, "
                                                 ".json for alpaca_eval")
    p.add_argument("--config", help="the run's sampling settings: a run config YAML, or a run's workdir "
                                    "(its config.yaml)")
    p.add_argument("--model-id", help="model_id (mt_bench) or generator (alpaca_eval); default: the --model "
                                      "directory's name")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model, when it holds one)")
    p.add_argument("--temperature", type=float, help="for every question; 0 is greedy")
    p.add_argument("--top-k", type=int, help="0 switches top-k off")
    p.add_argument("--top-p", type=float, help="1 switches top-p off")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="rows generated together")
    p.set_defaults(run=answer)

    p = commands.add_parser(
        "eval", help="lm-eval-harness tasks on a model (the `lm_eval` extra)", parents=[debug, processes],
        description="Runs lm-evaluation-harness's own evaluator with spacejax's model as its backend (the "
                    "scorer and sampler over all devices), so the flags mean what lm-eval's flags of the same "
                    "names mean, and writes lm-eval's files: OUTPUT_PATH/<model>/results_<date>.json and, with "
                    "--log-samples, samples_<task>_<date>.jsonl.")
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a spacejax params checkpoint")
    p.add_argument("--tasks", required=True, type=lambda text: [t for t in text.split(",") if t],
                   metavar="T1,T2", help="lm-eval task names")
    p.add_argument("--output-path", required=True, help="where lm-eval's result files go (local or gs://)")
    p.add_argument("--include-path", help="a folder of your own lm-eval task YAML files")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task (below 1: a fraction); for tests only")
    p.add_argument("--batch-size", type=int, default=8, help="rows per jitted call (a multiple of the device count)")
    p.add_argument("--log-samples", action="store_true", help="also write every request and response")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the tokenizer's template")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--max-length", type=int, help="the longest row scored (default: max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds and the sampling seed")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("plan", help="per-device memory and divisibility of a config on a topology", parents=[debug])
    p.add_argument("--config", required=True, help="a YAML file of configs/")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--devices", type=int, required=True, help="number of devices (chips)")
    p.add_argument("--hbm-gib", type=float, required=True, help="memory per device, GiB (v5p 95, v4 32)")
    p.set_defaults(run=plan_memory)
    p = commands.add_parser("bench", help="benchmarks: `bench stability` (loss stability curves over seeds), "
                                          "`bench throughput` (tokens/s, MFU, roofline)")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    p = benchmarks.add_parser("stability", help="SPIN, SPACE, SFT from one theta_0 per seed: KL and loss curves", parents=[debug])
    p.add_argument("--config", required=True, help="a YAML file of configs/ (configs/stability.yaml)")
    p.add_argument("--out", required=True, help="output directory (runs in OUT/seed_S/METHOD and "
                   "OUT/theta0_KN/seed_S/METHOD; resumes)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--methods", action="append", metavar="KIND[:recipe][:KEY=VALUE]...,...",
                   help="comma-separated methods of the theta_0-on-N regime (repeatable), e.g. "
                        "spin:beta=0.1,space:mu=2,sft,sft:data=4x,spin:recipe,dpo:beta=0.1; default: "
                        + ",".join(bench.DEFAULT_METHODS))
    p.add_argument("--theta0", type=_multiples, default=bench.DEFAULT_THETA0, metavar="Kx,...",
                   help="theta_0 regimes: theta_0 is SFT on K x N samples, every method then trains on N (default "
                        + ",".join(f"{k}x" for k in bench.DEFAULT_THETA0) + "; 1x alone is issue 7's benchmark)")
    p.add_argument("--theta0-methods", action="append", metavar="METHOD,...",
                   help="the methods of the regimes K > 1 (default: " + ",".join(bench.DEFAULT_THETA0_METHODS)
                        + "); their theta_0 run is the first on K x N samples, else sft:data=Kx for one iteration")
    p.add_argument("--compilation-cache", metavar="DIR", help="JAX's persistent compilation cache, so the runs share "
                   "their compiled programs (default OUT/jax_cache, unless JAX_COMPILATION_CACHE_DIR is set; "
                   "none: no cache)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides for every run")
    p.set_defaults(run=bench_stability)
    p = benchmarks.add_parser("throughput", help="tokens/s, MFU, decode roofline and memory of issue 8's model",
                              description=bench.throughput.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter, parents=[debug])
    p.add_argument("--out", required=True, help="JSON file to write (atomically)")
    p.add_argument("--config", help="a YAML file (default: configs/throughput.yaml, the 56M float32 Llama)")
    p.add_argument("--sampler-batches", type=_int_list, default=bench.throughput.SAMPLER_BATCHES,
                   metavar="B,B,...", help="generate batch sizes (default 8,32)")
    p.add_argument("--repeats", type=int, default=5, help="rounds, each timing one call of every part in turn (after a "
                   "warm-up call); each part's best call counts")
    p.add_argument("--matmul-size", type=int, default=bench.machine.MATMUL_SIZE,
                   help="side of the square matmul measuring the peak (default 2048)")
    p.add_argument("--bandwidth-bytes", type=int, default=bench.machine.BANDWIDTH_BYTES,
                   help="size of the array the bandwidth reduction reads (default 256 MiB)")
    p.add_argument("--profile", metavar="DIR", help="also trace one call of each part into DIR (jax.profiler) "
                                                   "and put its top XLA ops in the JSON and the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. model.num_layers=2 model.dtype=bfloat16")
    p.set_defaults(run=bench_throughput)

    p = commands.add_parser("plot", help="stability plots, curves and summary from run directories", parents=[debug])
    p.add_argument("workdirs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(run=plot_runs)
    return parser


# The errors of bad input (a file, a path, a config, a number): one line and exit status 2, without
# a traceback unless --debug. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, storage.StorageError, selfplay.NonFiniteLoss, yaml.YAMLError,
               jinja2.TemplateError, SafetensorError)
OS_HINTS = {errno.EACCES: "check its permissions, or choose another path",
            errno.EPERM: "check its permissions, or choose another path",
            errno.EROFS: "the file system is read-only: choose another path",
            errno.ENOSPC: "the disk is full: free some space, or choose another path",
            errno.EISDIR: "it is a directory: give the path of a file",
            errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path"}


def error_line(error: BaseException) -> str:
    """A user error as one line: an OSError as `FILE: what happened; what to do`, any other as its
    message with its lines joined."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        files = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
        hint = OS_HINTS.get(error.errno)
        text = f"{files}: {error.strerror}" + (f"; {hint}" if hint else "")
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax reports every save at INFO
    try:
        code = args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"spacejax {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
