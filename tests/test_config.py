"""The run config: reference environment variables, precedence, serialisation, presets, validation."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from typing import get_type_hints

import pytest

from golfjax.config import (
    SECTIONS,
    Config,
    ConfigError,
    apply_env,
    apply_overrides,
    env_name,
    from_dict,
    load_config_file,
    resolve,
    to_dict,
    to_json,
    validate,
)
from tests.conftest import REPO, write_config_setting

# The Hyperparameters of the reference train_gpt.py, read from the environment there.
REFERENCE_ENV_NAMES = """
VOCAB_SIZE NUM_LAYERS MODEL_DIM NUM_HEADS NUM_KV_HEADS MLP_MULT TIE_EMBEDDINGS ROPE_BASE LOGIT_SOFTCAP
QK_GAIN_INIT TRAIN_SEQ_LEN TRAIN_BATCH_TOKENS ITERATIONS WARMDOWN_ITERS WARMUP_STEPS MAX_WALLCLOCK_SECONDS
MATRIX_LR SCALAR_LR EMBED_LR HEAD_LR TIED_EMBED_LR TIED_EMBED_INIT_STD MUON_MOMENTUM MUON_BACKEND_STEPS
MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS BETA1 BETA2 ADAM_EPS GRAD_CLIP_NORM DATA_PATH
TOKENIZER_PATH SEED RUN_ID VAL_BATCH_SIZE VAL_LOSS_EVERY TRAIN_LOG_EVERY
""".split()


def all_fields() -> list[tuple[str, str, object]]:
    """(section, field name, default) for every field of every section."""
    return [(s, f.name, getattr(getattr(Config(), s), f.name)) for s in SECTIONS for f in fields(getattr(Config(), s))]


def declared_type(section: str, name: str) -> type:
    return get_type_hints(type(getattr(Config(), section)))[name]


def other_value(section: str, name: str, default: object) -> tuple[str, object]:
    """An environment string for a value different from `default`, and the value it must parse to."""
    typ = declared_type(section, name)
    if typ is bool:
        return ("0", False) if default else ("1", True)
    if typ is int:
        return str(default + 3), default + 3
    if typ is float:
        return repr(default + 0.25), default + 0.25
    assert typ is str, f"{section}.{name}: add a sample value for {typ}"
    return "some/other_value", "some/other_value"


def get(cfg: Config, section: str, name: str) -> object:
    return getattr(getattr(cfg, section), name)


# ----------------------------------------------------------------------------
# environment variables


def test_env_names_are_unique_upper_case_field_names():
    names = [env_name(name) for _, name, _ in all_fields()]
    assert names == [name.upper() for _, name, _ in all_fields()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"env names shared by several sections: {duplicates}"


@pytest.mark.parametrize("section, name, default", all_fields(), ids=[f"{s}.{n}" for s, n, _ in all_fields()])
def test_every_field_is_reachable_by_its_env_name(section, name, default):
    raw, expected = other_value(section, name, default)
    cfg, used = apply_env(Config(), {env_name(name): raw, "UNRELATED_VARIABLE": "1"})
    assert get(cfg, section, name) == expected
    assert type(get(cfg, section, name)) is declared_type(section, name)
    assert used == {env_name(name): raw}
    # every other field keeps its default
    changed = [(s, n) for s, n, d in all_fields() if get(cfg, s, n) != d]
    assert changed == [(section, name)]


def test_reference_hyperparameter_names_all_exist():
    ours = {env_name(name) for _, name, _ in all_fields()}
    assert sorted(set(REFERENCE_ENV_NAMES) - ours) == []


@pytest.mark.parametrize("raw, value", [("0", False), ("1", True), ("false", False), ("True", True), (" off ", False)])
def test_tie_embeddings_parses_as_a_boolean(raw, value):
    cfg, _ = apply_env(Config(), {"TIE_EMBEDDINGS": raw})
    assert cfg.model.tie_embeddings is value


def test_bad_values_name_the_variable():
    with pytest.raises(ConfigError, match="TIE_EMBEDDINGS.*'maybe'.*bool"):
        apply_env(Config(), {"TIE_EMBEDDINGS": "maybe"})
    with pytest.raises(ConfigError, match="NUM_LAYERS.*'abc'.*int"):
        apply_env(Config(), {"NUM_LAYERS": "abc"})
    with pytest.raises(ConfigError, match="model.num_layers.*'2.5'.*int"):
        apply_overrides(Config(), ["model.num_layers=2.5"])


def test_int_env_values_accept_underscores():
    cfg, _ = apply_env(Config(), {"TRAIN_BATCH_TOKENS": "524_288", "ITERATIONS": " 7 "})
    assert (cfg.train.train_batch_tokens, cfg.train.iterations) == (524_288, 7)


# ----------------------------------------------------------------------------
# --set and precedence


def test_set_reaches_every_field():
    overrides = [f"{s}.{n}={other_value(s, n, d)[0]}" for s, n, d in all_fields()]
    cfg = apply_overrides(Config(), overrides)
    assert {(s, n): get(cfg, s, n) for s, n, _ in all_fields()} == {
        (s, n): other_value(s, n, d)[1] for s, n, d in all_fields()
    }


@pytest.mark.parametrize(
    "item, message",
    [
        ("model.no_such_key=1", "unknown config key 'model.no_such_key'"),
        ("nosection.num_layers=1", "unknown section 'nosection'"),
        ("num_layers=1", "expected section.field=value"),
        ("model.num_layers", "expected section.field=value"),
    ],
)
def test_bad_set_items_are_config_errors(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [item])


def test_precedence_file_then_environment_then_set(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text(
        "from dataclasses import replace\n"
        "from golfjax.config import Config\n"
        "def get_config():\n"
        "    c = Config()\n"
        "    return replace(c, model=replace(c.model, num_layers=3, model_dim=256),\n"
        "                   train=replace(c.train, iterations=7, seed=1))\n"
    )
    environ = {"NUM_LAYERS": "4", "MODEL_DIM": "128", "SEED": "2", "PATH": "/usr/bin"}
    cfg, used = resolve(config_file, ["model.num_layers=5"], environ=environ)
    assert cfg.model.num_layers == 5  # file 3 < env 4 < --set 5
    assert cfg.model.model_dim == 128  # file 256 < env 128
    assert cfg.train.seed == 2  # file 1 < env 2
    assert cfg.train.iterations == 7  # file only
    assert cfg.model.num_heads == Config().model.num_heads  # default only
    assert used == {"NUM_LAYERS": "4", "MODEL_DIM": "128", "SEED": "2"}


def test_no_file_no_env_no_set_is_the_default():
    assert resolve(None, [], environ={}) == (Config(), {})


@pytest.mark.parametrize(
    "body, message",
    [
        (None, "config file not found"),
        ("x = 1\n", "must define get_config"),
        ("def get_config():\n    return {}\n", "returned dict"),
        ("raise ImportError('nope')\n", "failed to load: ImportError: nope"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path, body, message):
    path = tmp_path / "broken.py"
    if body is not None:
        path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config_file(path)
    assert str(path) in str(info.value)


# ----------------------------------------------------------------------------
# serialisation


@pytest.mark.parametrize("preset", ["default", "smoke", "everything_changed"])
def test_to_dict_from_dict_round_trip(preset):
    if preset == "default":
        cfg = Config()
    elif preset == "smoke":
        cfg = load_config_file(REPO / "configs" / "smoke.py")
    else:
        cfg = apply_overrides(Config(), [f"{s}.{n}={other_value(s, n, d)[0]}" for s, n, d in all_fields()])
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(to_json(cfg))) == cfg
    assert set(to_dict(cfg)) == set(SECTIONS)


def test_from_dict_accepts_partial_and_rejects_unknown():
    assert from_dict({"model": {"num_layers": 2}}) == replace(Config(), model=replace(Config().model, num_layers=2))
    with pytest.raises(ConfigError, match="unknown config keys in model: \\['no_such_key'\\]"):
        from_dict({"model": {"no_such_key": 1}})
    with pytest.raises(ConfigError, match="unknown config section 'nosection'"):
        from_dict({"nosection": {}})


# ----------------------------------------------------------------------------
# presets


def test_baseline_file_is_the_default_and_the_reference_baseline():
    cfg = load_config_file(REPO / "configs" / "baseline.py")
    assert cfg == Config()
    m, t = cfg.model, cfg.train
    assert (m.num_layers, m.model_dim, m.num_heads, m.num_kv_heads, m.mlp_mult) == (9, 512, 8, 4, 2)
    assert (m.vocab_size, m.tie_embeddings) == (1024, True)
    assert (t.train_seq_len, t.train_batch_tokens, t.iterations, t.max_wallclock_seconds) == (1024, 524_288, 20000, 600.0)
    assert (t.warmdown_iters, t.warmup_steps, t.seed) == (1200, 20, 1337)
    assert cfg.data.data_path == "./data/datasets/fineweb10B_sp1024"
    assert cfg.data.tokenizer_path == "./data/tokenizers/fineweb_1024_bpe.model"
    validate(cfg)


def test_smoke_file_loads_and_is_small():
    cfg, _ = resolve(REPO / "configs" / "smoke.py", environ={})
    assert cfg.model.num_layers < Config().model.num_layers
    assert cfg.train.train_batch_tokens < Config().train.train_batch_tokens
    assert cfg.train.iterations < Config().train.iterations
    assert cfg.data.data_path == ""  # builds its offline corpus


# Fields the golden run set on its command line (golden.json -> cli, non-null), plus
# max_wallclock_seconds, which the golden driver sets to 0 ("no wall-clock cap",
# golden/README.md). Every other numeric hyperparameter of the golden run is the
# reference's default, so golfjax's default must equal it.
GOLDEN_CLI_TO_FIELD = {
    "vocab_size": "vocab_size", "num_layers": "num_layers", "model_dim": "model_dim", "num_heads": "num_heads",
    "num_kv_heads": "num_kv_heads", "mlp_mult": "mlp_mult", "seq_len": "train_seq_len",
    "batch_tokens": "train_batch_tokens", "steps": "iterations", "seed": "seed",
    "warmdown_iters": "warmdown_iters", "warmup_steps": "warmup_steps", "val_batch_size": "val_batch_size",
}
GOLDEN_OVERRIDDEN_BESIDES_CLI = {"max_wallclock_seconds"}
# Options of the golden driver that are not hyperparameters (paths, device, precision, logging).
GOLDEN_CLI_NOT_CONFIG = {
    "data_path", "tokenizer", "out", "world_size", "precision", "muon_ns", "threads", "no_logits", "no_ns_compile",
}


def test_defaults_equal_the_golden_reference_defaults(golden_dir):
    golden = json.loads((golden_dir / "golden.json").read_text())
    hp, cli = golden["hyperparameters"], golden["cli"]
    assert (hp["warmdown_iters"], hp["warmup_steps"]) == (1200, 20)
    assert cli["warmdown_iters"] is None and cli["warmup_steps"] is None  # so these are the reference defaults
    assert hp["max_wallclock_seconds"] == 0.0

    assert set(cli) == set(GOLDEN_CLI_TO_FIELD) | GOLDEN_CLI_NOT_CONFIG, "the golden driver changed: review the lists"
    overridden = {GOLDEN_CLI_TO_FIELD[k] for k, v in cli.items() if k in GOLDEN_CLI_TO_FIELD and v is not None}
    overridden |= GOLDEN_OVERRIDDEN_BESIDES_CLI
    ours = {name: default for _, name, default in all_fields()}
    numeric = {k: v for k, v in hp.items() if isinstance(v, (int, float))}  # bools included
    assert sorted(set(numeric) - set(ours)) == [], "golden hyperparameters golfjax does not have"
    compared = sorted(set(numeric) - overridden)
    mismatched = {
        k: (ours[k], numeric[k])
        for k in compared
        if ours[k] != numeric[k] or isinstance(ours[k], bool) != isinstance(numeric[k], bool)
    }
    assert mismatched == {}, "golfjax default != reference default: {field: (ours, golden)}"
    assert len(compared) >= 20  # the comparison is not vacuous
    for name in overridden & set(numeric):  # the golden's CLI values reach the config through the env names
        cfg, _ = apply_env(Config(), {env_name(name): str(numeric[name])})
        assert next(get(cfg, s, n) for s, n, _ in all_fields() if n == name) == numeric[name]


# ----------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, "model_dim=100 must be divisible by num_heads=8"),
        ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, "num_heads=8 must be divisible by num_kv_heads=3"),
        ({"MODEL_DIM": "24", "NUM_HEADS": "8", "NUM_KV_HEADS": "4"}, "head_dim=3 must be even for RoPE"),
        ({"LOGIT_SOFTCAP": "0"}, "logit_softcap must be positive"),
        ({"TRAIN_SEQ_LEN": "0"}, "train_seq_len and train_batch_tokens must be positive"),
        ({"TRAIN_BATCH_TOKENS": "-8"}, "train_seq_len and train_batch_tokens must be positive"),
    ],
)
def test_validate_rejects_impossible_shapes(env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(None, [], environ=env)


@pytest.mark.parametrize("section, name, value, message", [
    ("model", "ve_layers", [7, 8], "model.ve_layers must be str, got list \\[7, 8\\]"),
    ("optim", "matrix_lr", "0.04", "optim.matrix_lr must be float, got str '0.04'"),
    ("train", "iterations", 2.5, "train.iterations must be int, got float 2.5"),
    ("model", "tie_embeddings", "yes", "model.tie_embeddings must be bool, got str 'yes'"),
    ("model", "tie_embeddings", 2, "model.tie_embeddings must be bool, got int 2"),
])
def test_validate_names_a_field_of_the_wrong_type(tmp_path, section, name, value, message):
    """A config file is Python: a wrong type is a ConfigError naming the field, not a traceback later."""
    path = write_config_setting(tmp_path / "typo.py", section, name, value)
    with pytest.raises(ConfigError, match=message):
        resolve(path, [], environ={})


def test_validate_accepts_numbers_of_other_kinds():
    """An int for a float, NumPy integers and 0/1 for a bool are what the file meant."""
    import numpy as np

    c = Config()
    validate(replace(c, optim=replace(c.optim, matrix_lr=1), train=replace(c.train, iterations=np.int64(5)),
                     model=replace(c.model, tie_embeddings=1)))


def test_validate_rejects_an_unknown_compute_dtype():
    with pytest.raises(ConfigError, match="compute_dtype must be auto/float32/bfloat16/float16, got 'int8'"):
        resolve(None, ["model.compute_dtype=int8"], environ={})
