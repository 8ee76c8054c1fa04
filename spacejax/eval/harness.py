"""lm-evaluation-harness on a spacejax model: the `spacejax` backend and the evaluation run.

`SpacejaxLM` is lm-eval's model interface over spacejax's own parts, registered in lm-eval's model
registry as `spacejax` when this module is imported (model_args `path=DIR`, a Hugging Face model
directory or a spacejax params checkpoint; see `SpacejaxLM`):

    loglikelihood          the scorer (`scoring.Scorer`, jitted over the mesh) on (context,
                           continuation) rows, sorted longest first as lm-eval's hf backend sorts
                           them, in fixed-size batches padded to a length bucket
    loglikelihood_rolling  the same on lm-eval's disjoint rolling windows of max_length tokens
    generate_until         the sampler (`sampler.SamplerGenerator`), greedy unless the task's
                           gen_kwargs ask for sampling, up to `max_gen_toks` new tokens (ending at
                           the end-of-text id); the text is cut at the first stop sequence

Tokenization, truncation and the order of requests follow lm-eval's `hf` backend, so the results
equal it on the Hugging Face export of the same model (tests/test_lm_eval.py). Generation decodes
to the end id or `max_gen_toks` and cuts at the stop strings afterwards, where hf stops decoding
at a stop string: the same text for greedy decoding.

Several processes: every process runs every request (lm-eval sees one rank, `world_size` 1) and
the jitted scorer and sampler split each batch over the mesh of all processes; only process 0
writes files (`evaluate`). lm-eval's own CLI cannot load a backend from another package, so
`lm_eval --model spacejax` works only in a Python process that imported this module; use
`spacejax eval`, which takes lm-eval's flags of the same names.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np
import yaml

from spacejax import data, metrics, model_dir, sharding, storage
from spacejax.config import ConfigError, MeshConfig, ModelConfig
from spacejax.sampler import Request, Sampling, SamplerGenerator
from spacejax.scoring import Scorer

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.utils import (Collator, handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as missing:  # the `lm_eval` extra
    raise ImportError("lm-eval is not installed: pip install 'spacejax[lm_eval]'") from missing

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for a generation task that sets no limit


@dataclasses.dataclass
class LoadedModel:
    """A model on a mesh with its tokenizer, ready for the backend."""

    cfg: ModelConfig
    params: dict
    tokenizer: object
    mesh: object


def load_model(path, tokenizer=None, mesh_cfg: MeshConfig = MeshConfig()) -> LoadedModel:
    """A Hugging Face directory or a spacejax params checkpoint (local or gs://), placed on a mesh
    of all devices, and its tokenizer (`tokenizer`, else the model directory's). Raises
    FileNotFoundError naming the directory when it holds no model or no tokenizer."""
    cfg, loaded_tokenizer, load_params = model_dir.open_model(path, tokenizer)
    if loaded_tokenizer is None:
        raise FileNotFoundError(f"{path} holds no tokenizer ({', '.join(model_dir.TOKENIZER_FILES)}); lm-eval tasks "
                                "are text: pass tokenizer=DIR (spacejax eval --tokenizer DIR)")
    mesh = sharding.make_mesh(mesh_cfg)
    cfg, params = load_params(sharding.param_shardings(cfg, mesh))
    return LoadedModel(cfg, params, loaded_tokenizer, mesh)


@register_model("spacejax")
class SpacejaxLM(TemplateLM):
    """lm-eval's LM on a spacejax model. model_args (lm-eval's `--model_args` / spacejax eval's flags):

        path            a Hugging Face model directory or a spacejax params checkpoint
        tokenizer       tokenizer directory (default: path)
        batch_size      rows per jitted call (a multiple of the mesh's data x fsdp size; default 8)
        max_length      the longest row scored (default the model's max_position_embeddings, as hf)
        max_gen_toks    new tokens of a generation task that sets none (default 256, as hf)
        add_bos_token   hf's flag: None keeps the tokenizer's own choice of special tokens
        seed            the sampling seed of generation tasks that sample
        data, fsdp, tensor   mesh axis sizes (one may be -1: the rest of the devices)

    In the loop, `SpacejaxLM.of(loaded)` wraps a model already on the run's mesh and `params` is
    replaced by each phase's. `device` and `max_batch_size`, which lm-eval passes to every backend,
    are ignored: jax places the model on its devices and the batch size is fixed.
    """

    def __init__(self, path: Optional[str] = None, tokenizer: Optional[str] = None, batch_size: int = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: Optional[bool] = None, seed: int = 0, data: int = -1, fsdp: int = 1, tensor: int = 1,
                 device=None, max_batch_size=None, loaded: Optional[LoadedModel] = None, progress: bool = True):
        super().__init__()
        if loaded is None:
            if path is None:
                raise ValueError("the spacejax backend needs model_args path=DIR (a model directory)")
            loaded = load_model(path, tokenizer, MeshConfig(int(data), int(fsdp), int(tensor)))
        self.model_cfg, self.params, self.tokenizer, self.mesh = loaded.cfg, loaded.params, loaded.tokenizer, loaded.mesh
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model_cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed, self.progress = int(seed), progress
        self.scorer = Scorer(self.model_cfg, self.mesh, self.batch_size, progress=False)
        self._buckets = length_buckets(self.max_length + 1)
        self._rank, self._world_size = 0, 1  # every process runs every request (see the module doc)
        self.end_ids = tuple(model_dir.end_ids(self.model_cfg, self.tokenizer))

    @classmethod
    def of(cls, loaded: LoadedModel, **kwargs) -> "SpacejaxLM":
        return cls(loaded=loaded, **kwargs)

    # ------------------------------------------------------------------ tokens, as lm-eval's hf backend

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _special_tokens(self, string: str, add_special_tokens: Optional[bool]) -> dict:
        """The tokenizer's `add_special_tokens` for `string`: explicit, else hf's flag, else the
        tokenizer's default unless the string already starts with the prefix token."""
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            return {"add_special_tokens": False}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, **self._special_tokens(string, add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """[(request, context ids, continuation ids)] -> [(sum of the continuation's log-probs,
        whether it is the greedy continuation)], in the order given. A row longer than
        max_length + 1 keeps its last max_length + 1 tokens (the context is cut on the left)."""
        rows = [self._row(context, continuation) for _, context, continuation in requests]
        order = Collator(list(range(len(rows))), sort_fn=lambda i: (-sum(map(len, rows[i])), rows[i]))
        results: list = []
        bar = metrics.progress(total=len(rows), desc="lm-eval loglikelihood", unit="request") if (
            self.progress and not disable_tqdm) else None
        for batch in order.get_batched(n=self.batch_size):
            results += self._score([rows[i] for i in batch])
            if bar is not None:
                bar.update(len(batch))
        if bar is not None:
            bar.close()
        return order.get_original(results)

    def _row(self, context: list[int], continuation: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(context, continuation) cut to the last max_length + 1 tokens, the continuation whole."""
        if not continuation or len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens: it must have 1 to max_length "
                             f"({self.max_length}) tokens")
        keep = self.max_length + 1 - len(continuation)
        return tuple(context[-keep:] if keep else ()), tuple(continuation)

    def _score(self, rows: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[float, bool]]:
        """One batch, longest first: padded to the longest row's length bucket."""
        longest = max(len(c) + len(r) for c, r in rows)
        length = data.bucket_length(longest, self.max_length + 1, self._buckets)
        batch = data.pad_sequences([np.array(c, np.int32) for c, _ in rows], [np.array(r, np.int32) for _, r in rows],
                                   length=length, pad_id=self._pad_id)
        logps, greedy = self.scorer.score(self.params, batch, greedy=True)
        return [(float(lp), bool(g)) for lp, g in zip(logps, greedy)]

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eot_token_id if pad is None else pad

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts: lm-eval's disjoint windows of max_length tokens, each
        conditioned on the tokens before it in its window (the first on the prefix token), summed."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = np.zeros(len(requests))
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logp
        return [float(total) for total in totals]

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at its stop strings (and the end-of-text text); one
        sampler call per distinct set of generation settings."""
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict = {}
        for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append((index, context))
        results: list = [None] * len(requests)
        for key, members in groups.items():
            settings = normalize_gen_kwargs(json.loads(key), self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_gen_toks = settings.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"a generation task asks for {max_gen_toks} new tokens, not fewer than the model's "
                                 f"max_length ({self.max_length})")
            generator = SamplerGenerator(self.model_cfg, self.mesh, _sampling(settings), self.batch_size,
                                         self._pad_id, self.end_ids, progress=self.progress and not disable_tqdm)
            prompts = [np.array(self.tok_encode(context)[-(self.max_length - max_gen_toks):], np.int32)
                       for _, context in members]
            responses = generator.generate(self.params, [Request(p, max_gen_toks) for p in prompts], self.seed)
            for (index, _), (ids,) in zip(members, responses):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                results[index] = postprocess_generated_text(text, until, None)
        return results


def length_buckets(longest: int, smallest: int = 16) -> tuple[int, ...]:
    """Row lengths of the scoring batches: four per octave (16, 20, 24, 28, 32, 40, ...) below
    `longest` (which `data.bucket_length` adds). A row is padded by less than a quarter (two per
    octave measured 0.83x lm-eval's hf backend on the CPU benchmark, which pads to the longest row),
    at one compilation per bucket used (at most 29 up to 2048 tokens)."""
    buckets, size = [], smallest
    while size < longest:
        buckets += [b for b in (size, size * 5 // 4, size * 3 // 2, size * 7 // 4) if b < longest]
        size *= 2
    return tuple(buckets)


def _sampling(settings: dict) -> Sampling:
    """lm-eval's normalized gen_kwargs -> a sampling strategy: greedy unless do_sample with a
    temperature above 0."""
    if not settings.get("do_sample") or not settings.get("temperature"):
        return Sampling(0.0)
    return Sampling(float(settings["temperature"]), top_k=settings.get("top_k") or None,
                    top_p=settings.get("top_p"))


# ---------------------------------------------------------------------------------- evaluation


def task_manager(include_path: Optional[str] = None, tasks: Sequence[str] = ()):
    """lm-eval's TaskManager that finds `tasks`: over `include_path` alone when they are all there
    (indexing lm-eval's own thousands of task files takes seconds), else over lm-eval's tasks too.
    Every YAML file of `include_path` must parse (lm-eval skips a broken one silently, and then
    reports its task as unknown). Raises ConfigError naming a task found in neither."""
    if include_path is not None:
        if not os.path.isdir(include_path):
            raise FileNotFoundError(f"--include-path {include_path} is not a directory of task YAML files")
        for file in sorted(glob.glob(os.path.join(include_path, "**", "*.yaml"), recursive=True)):
            _check_task_file(file)
        manager = _manager(include_path, False)
        if tasks and all(manager.match_tasks([task]) for task in tasks):
            return manager
    manager = _manager(include_path, True)
    unknown = [task for task in tasks if not manager.match_tasks([task])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task {unknown[0]!r}: not among lm-eval's tasks nor in the include path; "
                          "`lm_eval ls tasks` lists them, or pass --include-path DIR for your own task files")
    return manager


@functools.lru_cache(maxsize=8)
def _manager(include_path: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


class _TaskYaml(yaml.SafeLoader):
    """YAML as lm-eval's task files use it: any tag (`!function utils.process_docs`) is a plain value."""


_TaskYaml.add_multi_constructor("!", lambda loader, tag, node: None)


def _check_task_file(file: str) -> None:
    try:
        with open(file, encoding="utf-8") as handle:
            parsed = yaml.load(handle, Loader=_TaskYaml)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as error:
        raise ValueError(f"task file {file} does not parse: {' '.join(str(error).split())}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"task file {file} must hold a mapping (task: NAME, ...), got {type(parsed).__name__}")


def evaluate(model, tasks: Sequence[str], *, model_args: Optional[dict] = None, num_fewshot: Optional[int] = None,
             limit: Optional[float] = None, include_path: Optional[str] = None, log_samples: bool = False,
             apply_chat_template: bool = False, output_path=None, random_seed: int = 0) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` on `model` (the name "spacejax" with `model_args`, or
    a SpacejaxLM), on every process; process 0 writes lm-eval's own files under `output_path`
    (results_<date>.json, and samples_<task>_<date>.jsonl with `log_samples`, in the folder of the
    model's name; gs:// too). Returns lm-eval's results dict (without the samples)."""
    manager = task_manager(include_path, tasks)
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, log_samples=log_samples,
        apply_chat_template=apply_chat_template, random_seed=random_seed, numpy_random_seed=random_seed,
        torch_random_seed=random_seed, fewshot_random_seed=random_seed)
    samples = results.pop("samples", None)
    if output_path is not None and jax.process_index() == 0:
        write_results(results, samples if log_samples else None, output_path, model_args)
    sharding.barrier("lm-eval results written")
    return results


def write_results(results: dict, samples: Optional[dict], output_path, model_args: Optional[dict]) -> None:
    """lm-eval's files, written by its EvaluationTracker into a local folder (it writes through
    pathlib) and then copied to `output_path` (which may be gs://), each file whole."""
    with tempfile.TemporaryDirectory() as local:
        tracker = EvaluationTracker(output_path=local)
        tracker.general_config_tracker.log_experiment_args(
            model_source="spacejax", model_args=model_args or {}, system_instruction=None, chat_template=None,
            fewshot_as_multiturn=False)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results["configs"] if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
        target = storage.location(output_path)
        for file in sorted(glob.glob(os.path.join(local, "**", "*.json*"), recursive=True)):
            with open(file, "rb") as handle:
                storage.write_atomic(target / os.path.relpath(file, local), handle.read())


def scores(results: dict) -> dict[str, float]:
    """lm-eval's results as flat `eval/lm_eval/<task>/<metric>` values: its "acc,none" is `acc`,
    another filter's is `acc/<filter>`; stderr values included, non-numbers dropped."""
    flat = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filtered = key.partition(",")
            if not filtered or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filtered == "none" else f"{metric}/{filtered}"
            flat[f"eval/lm_eval/{task}/{name}"] = float(value)
    return flat
