"""spacejax.config: the shipped YAML recipes, dotted overrides, load-time errors and round trips.

DESIGN.md ("Configuration"): unknown keys, wrong types and impossible values fail at load time
with a message that names the key. Every error test therefore matches the dotted key.
"""

import dataclasses
import math
import pathlib
import re

import pytest
import yaml

from spacejax import config, losses
from spacejax.config import ConfigError, RunConfig

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
ALL_YAML = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.yml"))
RECIPES_7B = ("zephyr7b_spin", "zephyr7b_space", "mistral7b_space")


def recipe(name: str, *overrides: str) -> RunConfig:
    return config.load(CONFIGS / f"{name}.yaml", overrides)


@pytest.fixture
def empty_yaml(tmp_path):
    """An empty config file: every value is the schema default, so overrides are tested alone."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def load_with(path, *overrides: str) -> RunConfig:
    return config.load(path, overrides)


# --------------------------------------------------------------------------- the shipped YAML files

def test_configs_directory_holds_the_7b_recipes():
    names = {p.stem for p in ALL_YAML}
    assert set(RECIPES_7B) <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_in_configs_loads(path):
    cfg = config.load(path)
    assert isinstance(cfg, RunConfig)
    losses.get_loss(cfg.loss.kind)  # a misspelt loss kind would otherwise only fail at launch


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_every_yaml_dumps_and_loads_back_identically(path, tmp_path):
    """The resolved config written to the workdir (prepare_workdir) reads back as the same run."""
    cfg = config.load(path)
    assert config.load(_write(tmp_path / "resolved.yaml", config.dump(cfg))) == cfg
    assert config.from_dict(RunConfig, config.to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", RECIPES_7B)
def test_7b_recipe_is_a_mistral_7b_trained_in_mixed_precision(name):
    cfg = recipe(name)
    m = cfg.model
    assert m.architecture == "mistral"
    assert (m.vocab_size, m.hidden_size, m.intermediate_size) == (32000, 4096, 14336)
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (32, 32, 8, 128)
    assert m.num_heads * m.head_dim == m.hidden_size
    assert m.rms_norm_eps == pytest.approx(1e-5)
    assert m.max_position_embeddings == 32768
    assert m.tie_word_embeddings is False
    assert (m.bos_token_id, m.eos_token_ids) == (1, (2,))
    # float32 master weights, bf16 compute: bf16 weights would round lr ~5e-7 updates away.
    assert (m.param_dtype, m.dtype, m.remat) == ("float32", "bfloat16", "full")
    # Starts from a local Hugging Face directory and tokenizes real text with its tokenizer.
    assert cfg.init_from.startswith("/") and cfg.data.tokenizer.startswith("/")
    assert cfg.data.source != "toy"
    # SPIN's recipe values shared by all three runs.
    assert (cfg.data.num_train, cfg.data.max_length, cfg.data.max_prompt_length) == (50000, 1024, 512)
    assert cfg.data.buckets[-1] == cfg.data.max_length
    assert (cfg.sampler.max_new_tokens, cfg.sampler.temperature, cfg.sampler.num_samples) == (256, 1.0, 1)
    t = cfg.train
    assert (t.optimizer, t.schedule, t.warmup_ratio, t.weight_decay) == ("rmsprop", "linear", 0.1, 0.0)
    assert (t.batch_size, t.grad_accum_steps, t.epochs) == (64, 1, 2)
    assert t.learning_rate == pytest.approx(5e-7)
    assert cfg.selfplay.sft_epochs == 0
    assert (cfg.mesh.tensor, cfg.mesh.data) == (1, -1)


@pytest.mark.parametrize("name", RECIPES_7B)
@pytest.mark.parametrize("devices", [8, 16, 32, 64], ids=lambda n: f"{n}chips")
def test_7b_recipe_batches_divide_over_v5p_slices(name, devices):
    """v5p-16 .. v5p-128 (8 .. 64 chips): data = -1 fills the rest, and every batch of every
    iteration must split evenly over data x fsdp (sharding of the batch axis)."""
    cfg = recipe(name)
    assert devices % (cfg.mesh.fsdp * cfg.mesh.tensor) == 0
    config.check_batch_sizes(cfg, devices // cfg.mesh.tensor)  # data x fsdp


def test_zephyr7b_spin_is_spins_official_recipe():
    cfg = recipe("zephyr7b_spin")
    assert cfg.init_from.rstrip("/").endswith("zephyr-7b-sft-full")
    assert (cfg.loss.kind, cfg.loss.beta, cfg.loss.label_smoothing) == ("spin", 0.1, 0.0)
    assert cfg.selfplay.mix_previous is True
    assert (cfg.model.rope_theta, cfg.model.sliding_window) == (10000.0, 4096)  # Mistral v0.1


@pytest.mark.parametrize("name", ["zephyr7b_space", "mistral7b_space"])
def test_space_recipes_use_the_nce_loss(name):
    cfg = recipe(name)
    assert (cfg.loss.kind, cfg.loss.mu, cfg.loss.beta) == ("space", 1.0, 1.0)
    # The noise must come from the opponent whose log-probs define the reward.
    assert cfg.selfplay.mix_previous is False


def test_space_recipes_differ_only_in_the_starting_model():
    zephyr, mistral = recipe("zephyr7b_space"), recipe("mistral7b_space")
    assert (zephyr.model.rope_theta, zephyr.model.sliding_window) == (10000.0, 4096)
    assert (mistral.model.rope_theta, mistral.model.sliding_window) == (1e6, None)  # Mistral v0.2
    assert "Mistral-7B-Instruct-v0.2" in mistral.init_from
    same_model = dataclasses.replace(mistral.model, rope_theta=10000.0, sliding_window=4096)
    assert dataclasses.replace(mistral, init_from=zephyr.init_from, model=same_model,
                               data=dataclasses.replace(mistral.data, tokenizer=zephyr.data.tokenizer)) == zephyr


# --------------------------------------------------------------------------- dotted overrides

def test_overrides_reach_top_level_section_and_nested_keys():
    cfg = recipe("zephyr7b_spin", "loss.mu=4", "selfplay.iterations=2", "seed=3", "data.toy.num_contexts=2")
    assert cfg.loss.mu == 4.0 and isinstance(cfg.loss.mu, float)  # an int where a float is due
    assert cfg.selfplay.iterations == 2
    assert cfg.seed == 3
    assert cfg.data.toy.num_contexts == 2
    # Keys that were not overridden keep the file's values.
    assert cfg.loss.beta == 0.1 and cfg.data.num_train == 50000 and cfg.data.toy.num_symbols == 8


def test_override_values_are_parsed_as_yaml(empty_yaml):
    cfg = load_with(empty_yaml, "data.buckets=[16,32]", "loss.beta=null", "train.learning_rate=3.0e-4",
                    "init_from=/mnt/models/x", "selfplay.mix_previous=true", "model.eos_token_ids=[2, 7]",
                    "model.rope_theta=500000")
    assert cfg.data.buckets == (16, 32)  # YAML list -> the schema's tuple
    assert cfg.loss.beta is None
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert cfg.init_from == "/mnt/models/x"
    assert cfg.selfplay.mix_previous is True
    assert cfg.model.eos_token_ids == (2, 7)
    assert cfg.model.rope_theta == 500000.0


def test_float_written_without_a_dot_is_a_float(empty_yaml):
    # YAML 1.1 reads 1e-4 as the string "1e-4"; the schema still takes it as a float.
    cfg = load_with(empty_yaml, "train.learning_rate=1e-4", "model.rms_norm_eps=1e-5")
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model.rms_norm_eps == pytest.approx(1e-5)


def test_override_splits_at_the_first_equals_sign_and_strips_the_key(empty_yaml):
    cfg = load_with(empty_yaml, "data.source=/data/a=b.jsonl", " loss.mu = 2")
    assert cfg.data.source == "/data/a=b.jsonl"
    assert cfg.loss.mu == 2.0


def test_later_override_wins_and_creates_missing_sections(empty_yaml):
    cfg = load_with(empty_yaml, "checkpoint.keep=5", "checkpoint.keep=7", "model.rope_scaling.factor=4")
    assert cfg.checkpoint.keep == 7
    assert cfg.model.rope_scaling == config.RopeScaling(factor=4.0)


def test_an_empty_file_is_the_default_config(empty_yaml):
    assert config.load(empty_yaml) == RunConfig()


def test_overrides_leave_the_file_untouched(tmp_path):
    path = _write(tmp_path / "c.yaml", "loss:\n  mu: 2.0\n")
    assert config.load(path, ["loss.mu=8"]).loss.mu == 8.0
    assert config.load(path).loss.mu == 2.0


# --------------------------------------------------------------------------- errors name the key

@pytest.mark.parametrize("override, key", [
    ("sede=3", "sede"),
    ("loss.muu=2", "loss.muu"),
    ("data.toy.colour=1", "data.toy.colour"),
    ("model.rope_scaling.factr=2", "model.rope_scaling.factr"),
])
def test_unknown_key(empty_yaml, override, key):
    with pytest.raises(ConfigError, match=rf"unknown key {re.escape(key)}\b"):
        load_with(empty_yaml, override)


def test_unknown_key_in_the_file_is_named(tmp_path):
    path = _write(tmp_path / "c.yaml", "train:\n  learning_rate: 1.0e-6\n  lr_warmup: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lr_warmup"):
        config.load(path)
    path = _write(tmp_path / "d.yaml", "optimiser:\n  kind: rmsprop\n")
    with pytest.raises(ConfigError, match=r"unknown key optimiser"):
        config.load(path)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=two", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),  # no silent truncation of a float to an int
    ("train.epochs=true", "train.epochs"),  # a bool is not an int here
    ("loss.mu=true", "loss.mu"),
    ("loss.mu=", "loss.mu"),  # empty value: YAML null, and mu is not optional
    ("loss.mu=abc", "loss.mu"),
    ("data.source=3", "data.source"),
    ("data.buckets=16", "data.buckets"),
    ("data.buckets=[16, x]", r"data.buckets[1]"),
    ("selfplay.mix_previous=[1]", "selfplay.mix_previous"),
    ("model=3", "model"),
    ("data.toy=[1, 2]", "data.toy"),
])
def test_wrong_type(empty_yaml, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_with(empty_yaml, override)


@pytest.mark.parametrize("override, key", [
    ("loss.mu=0", "loss.mu"),
    ("loss.mu=-1", "loss.mu"),
    ("loss.mu=-0.5", "loss.mu"),
    ("loss.beta=0", "loss.beta"),
    ("loss.label_smoothing=0.5", "loss.label_smoothing"),
    ("train.learning_rate=0", "train.learning_rate"),
    ("train.epochs=0", "train.epochs"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio"),
    ("sampler.top_p=0", "sampler.top_p"),
    ("sampler.temperature=-1", "sampler.temperature"),
    ("data.num_train=-1", "data.num_train"),
    ("data.max_prompt_length=1024", "data.max_prompt_length"),
    ("model.num_kv_heads=3", "model.num_heads"),
    ("model.head_dim=15", "model.head_dim"),
    ("model.sliding_window=0", "model.sliding_window"),
    ("model.param_dtype=float16", "model.param_dtype"),
    ("model.remat=some", "model.remat"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps"),
    ("selfplay.iterations=0", "selfplay.iterations"),
])
def test_impossible_value(empty_yaml, override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_with(empty_yaml, override)


def test_unknown_optimizer_and_schedule_are_named(empty_yaml):
    with pytest.raises(ConfigError, match=r"train\.optimizer.*rmsprop"):  # the message lists the choices
        load_with(empty_yaml, "train.optimizer=sgd")
    with pytest.raises(ConfigError, match=r"train\.schedule"):
        load_with(empty_yaml, "train.schedule=step")


def test_batch_the_data_axes_cannot_divide(empty_yaml):
    with pytest.raises(ConfigError, match=r"train\.batch_size.*mesh data x fsdp = 4"):
        load_with(empty_yaml, "train.batch_size=6", "mesh.data=4", "mesh.fsdp=1")
    with pytest.raises(ConfigError, match=r"sampler\.batch_size = 6 is not divisible by mesh data x fsdp = 4"):
        load_with(empty_yaml, "sampler.batch_size=6", "mesh.data=4", "mesh.fsdp=1")
    # The divisibility is of the micro-batch: 16 / 2 accumulation steps = 8 over 4 x 4 shards fails.
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_with(empty_yaml, "train.batch_size=16", "train.grad_accum_steps=2", "mesh.data=4", "mesh.fsdp=4")
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps"):
        load_with(empty_yaml, "train.batch_size=10", "train.grad_accum_steps=4")


def test_every_iteration_batch_must_divide(empty_yaml):
    """With data = -1, `spacejax train` checks at run time, on the device count, what load time can not."""
    cfg = load_with(empty_yaml, "selfplay.from_iteration=['2: sampler.batch_size=12']")
    config.check_batch_sizes(cfg, 4)
    with pytest.raises(ConfigError, match=r"sampler\.batch_size = 12 \(iteration 2\) is not divisible by mesh "
                                          r"data x fsdp = 8: make it a multiple of 8"):
        config.check_batch_sizes(cfg, 8)
    with pytest.raises(ConfigError, match=r"data\.num_eval = 64 is not divisible by mesh data x fsdp = 128"):
        config.check_batch_sizes(load_with(empty_yaml, "train.batch_size=128", "sampler.batch_size=128"), 128)


def test_batches_that_do_divide_are_accepted(empty_yaml):
    assert load_with(empty_yaml, "train.batch_size=8", "mesh.data=4", "mesh.fsdp=2").train.batch_size == 8
    cfg = load_with(empty_yaml, "train.batch_size=16", "train.grad_accum_steps=2", "mesh.data=2", "mesh.fsdp=4")
    assert cfg.train.grad_accum_steps == 2
    # With data = -1 the mesh size is only known from the device count, at run time.
    assert load_with(empty_yaml, "train.batch_size=6", "mesh.data=-1", "mesh.fsdp=4").train.batch_size == 6


@pytest.mark.parametrize("overrides", [["mesh.data=-1", "mesh.fsdp=-1"], ["mesh.fsdp=0"], ["mesh.tensor=-2"]])
def test_impossible_mesh(empty_yaml, overrides):
    with pytest.raises(ConfigError, match=r"mesh"):
        load_with(empty_yaml, *overrides)


@pytest.mark.parametrize("override", ["loss.mu", "loss.mu:4", "=4"])
def test_malformed_override(empty_yaml, override):
    with pytest.raises(ConfigError, match=re.escape(repr(override))):
        load_with(empty_yaml, override)


def test_override_through_a_value_that_is_not_a_section(empty_yaml):
    with pytest.raises(ConfigError, match=r"seed is not a section"):  # seed set, then used as a section
        load_with(empty_yaml, "seed=3", "seed.value=1")
    with pytest.raises(ConfigError, match=r"seed must be of type int"):  # seed unset: a mapping is built
        load_with(empty_yaml, "seed.value=1")


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "no_such_config.yaml"
    with pytest.raises(ConfigError, match=r"no_such_config\.yaml"):
        config.load(missing)


def test_a_file_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path / "list.yaml", "- seed\n- 3\n")
    with pytest.raises(ConfigError, match=r"list\.yaml"):
        config.load(path)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("override", ["loss.mu=.nan", "loss.mu=.inf", "train.learning_rate=.nan", "loss.beta=.inf"])
def test_non_finite_values_are_refused(empty_yaml, override):
    with pytest.raises(ConfigError, match=re.escape(override.split("=")[0])):
        load_with(empty_yaml, override)


def test_unparsable_yaml_is_a_config_error(empty_yaml, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_with(empty_yaml, "data.source=[unclosed")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        config.load(_write(tmp_path / "broken.yaml", "model: {hidden_size: [1,\n"))


# --------------------------------------------------------------------------- round trips

def _nondefault_config() -> RunConfig:
    """A config off every default that matters: nested sections, tuples, Optional set and unset."""
    base = RunConfig()
    return dataclasses.replace(
        base, seed=7, init_from="/mnt/models/m",
        model=dataclasses.replace(base.model, architecture="qwen2", qkv_bias=True, sliding_window=128,
                                  rope_scaling=config.RopeScaling(factor=4.0), eos_token_ids=(5, 6),
                                  bos_token_id=None, param_dtype="bfloat16", rms_norm_eps=1e-5),
        data=dataclasses.replace(base.data, buckets=(32, 64), tokenizer="/tok",
                                 toy=config.ToyConfig(num_contexts=3, end_probability=0.2)),
        loss=config.LossConfig(kind="spin", mu=2.5, beta=None),
        train=dataclasses.replace(base.train, learning_rate=1e-7, optimizer="adamw", batch_size=16,
                                  grad_accum_steps=2),
        mesh=config.MeshConfig(data=2, fsdp=4, tensor=1),
        selfplay=dataclasses.replace(base.selfplay, mix_previous=True, iterations=4),
    )


@pytest.mark.parametrize("cfg", [RunConfig(), _nondefault_config()], ids=["default", "nondefault"])
def test_to_dict_from_dict_round_trip(cfg):
    plain = config.to_dict(cfg)
    assert config.from_dict(RunConfig, plain) == cfg
    # Plain data only: JSON/YAML-ready, tuples written as lists.
    assert isinstance(plain["data"]["buckets"], list) and isinstance(plain["model"], dict)
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain


@pytest.mark.parametrize("cfg", [RunConfig(), _nondefault_config()], ids=["default", "nondefault"])
def test_dump_then_load_round_trip(cfg, tmp_path):
    text = config.dump(cfg)
    loaded = config.load(_write(tmp_path / "resolved.yaml", text))
    assert loaded == cfg
    assert config.dump(loaded) == text  # stable: a resumed run compares these texts
    assert math.isclose(loaded.train.learning_rate, cfg.train.learning_rate)


def test_from_dict_names_nested_keys_with_their_section():
    with pytest.raises(ConfigError, match=r"unknown key model\.rope_scaling\.factr"):
        config.from_dict(RunConfig, {"model": {"rope_scaling": {"factr": 2}}})
    with pytest.raises(ConfigError, match=r"unknown key muu"):
        config.from_dict(config.LossConfig, {"muu": 1.0})


def _write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- per-iteration changes

def test_spin_recipe_changes_lr_at_iteration_2_and_beta_at_iteration_3():
    cfg = recipe("zephyr7b_spin")
    by_iteration = [(config.at_iteration(cfg, t).train.learning_rate, config.at_iteration(cfg, t).loss.beta)
                    for t in range(-1, 4)]
    assert by_iteration == [(5e-7, 0.1), (5e-7, 0.1), (5e-7, 0.1), (1e-7, 0.1), (1e-7, 5.0)]
    assert config.at_iteration(cfg, 3).selfplay.from_iteration == ()
    # Everything else is the run's config.
    assert dataclasses.replace(config.at_iteration(cfg, 3), train=cfg.train, loss=cfg.loss,
                               selfplay=cfg.selfplay) == cfg


def test_from_iteration_accepts_yaml_mappings_and_applies_changes_in_order(empty_yaml):
    cfg = load_with(empty_yaml, "selfplay.from_iteration=[1: loss.mu=2, '2: loss.mu=3', 1: sampler.temperature=0.5]")
    assert cfg.selfplay.from_iteration == ("1: loss.mu=2", "2: loss.mu=3", "1: sampler.temperature=0.5")
    assert [config.at_iteration(cfg, t).loss.mu for t in (0, 1, 2)] == [1.0, 2.0, 3.0]
    assert config.at_iteration(cfg, 2).sampler.temperature == 0.5


@pytest.mark.parametrize("entry, message", [
    ("'1: model.hidden_size=8'", "only \\['loss', 'train', 'sampler'\\] may change"),
    ("'1 loss.mu=2'", "must look like 'ITERATION: section.key=value'"),
    ("'1: loss.muu=2'", "unknown key loss.muu"),
    ("'2: loss.mu=-1'", "loss.mu must be > 0"),
])
def test_bad_from_iteration_entries_are_named(empty_yaml, entry, message):
    with pytest.raises(ConfigError, match="selfplay.from_iteration entry .*" + message):
        load_with(empty_yaml, f"selfplay.from_iteration=[{entry}]")
