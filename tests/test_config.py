"""Program configs: TOML -> attrs classes, errors that name the key, overrides, built-ins, round trips."""

from __future__ import annotations

import math
import pathlib
import tomllib
from typing import Literal

import attrs
import pytest

from ftprog.programs.config import (
    ConfigError, builtin_configs, deep_merge, from_dict, load_config, parse_overrides, to_dict, to_toml,
)


def _positive(instance, attribute, value):
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")


@attrs.frozen
class ModelSection:
    path: str = ""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    revision: str | None = None


@attrs.frozen
class PeftSection:
    method: Literal["none", "lora", "dora", "qlora"] = "none"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    modules_to_save: list[str] = attrs.Factory(list)


@attrs.frozen
class OptimizerSection:
    lr: float = attrs.field(default=1e-4, validator=_positive)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@attrs.frozen
class SFTConfig:
    model: ModelSection = ModelSection()
    seq_len: int = 512
    compile: bool = False
    peft: PeftSection = PeftSection()
    optimizer: OptimizerSection = OptimizerSection()
    tags: dict[str, str] = attrs.Factory(dict)
    max_steps: int | None = None
    output: pathlib.Path = pathlib.Path("out")


@attrs.frozen
class Required:
    name: str
    count: int = 1


# -- from_dict ---------------------------------------------------------------------------------------


def test_nested_parsing_with_defaults():
    cfg = from_dict(SFTConfig, {"model": {"path": "/m", "dtype": "bf16"}, "peft": {"method": "lora", "rank": 16},
                                "optimizer": {"lr": 3e-4}}, source="x.toml")
    assert cfg.model == ModelSection(path="/m", dtype="bf16")
    assert cfg.peft == PeftSection(method="lora", rank=16) and cfg.peft.targets == ("q_proj", "v_proj")
    assert cfg.optimizer.lr == 3e-4 and cfg.optimizer.betas == (0.9, 0.999)
    assert cfg.seq_len == 512 and cfg.compile is False and cfg.tags == {} and cfg.max_steps is None
    assert from_dict(SFTConfig, {}, source="x.toml") == SFTConfig()


def test_field_types():
    cfg = from_dict(SFTConfig, {
        "model": {"revision": "main"}, "max_steps": 100, "tags": {"team": "nlp", "run": "a"},
        "peft": {"targets": ["q_proj", "k_proj", "o_proj"], "modules_to_save": ["lm_head"], "alpha": 32},
        "optimizer": {"betas": [0.8, 0.95]}, "output": "runs/1",
    }, source="x.toml")
    assert cfg.model.revision == "main" and cfg.max_steps == 100 and cfg.tags == {"team": "nlp", "run": "a"}
    assert cfg.peft.targets == ("q_proj", "k_proj", "o_proj") and isinstance(cfg.peft.targets, tuple)
    assert cfg.peft.modules_to_save == ["lm_head"] and isinstance(cfg.peft.modules_to_save, list)
    assert cfg.peft.alpha == 32.0 and type(cfg.peft.alpha) is float  # int accepted for float
    assert cfg.optimizer.betas == (0.8, 0.95) and cfg.output == pathlib.Path("runs/1")


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.lrr' in my\.toml; did you mean 'optimizer\.lr'\?"):
        from_dict(SFTConfig, {"optimizer": {"lrr": 1e-3}}, source="my.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'optimzer' in my\.toml; did you mean 'optimizer'\?"):
        from_dict(SFTConfig, {"optimzer": {}}, source="my.toml")
    with pytest.raises(ConfigError, match=r"unknown key 'peft\.zzz' in my\.toml; valid keys in 'peft': alpha, "):
        from_dict(SFTConfig, {"peft": {"zzz": 1}}, source="my.toml")
    with pytest.raises(ConfigError) as info:
        from_dict(SFTConfig, {"seqlen": 3}, source="my.toml")
    assert info.value.key == "seqlen" and info.value.source == "my.toml" and "'seq_len'" in str(info.value)


@pytest.mark.parametrize("data, pattern", [
    ({"seq_len": "long"}, r"'seq_len' in c\.toml: expected int, got 'long' \(str\)"),
    ({"seq_len": 1.5}, r"'seq_len' in c\.toml: expected int, got 1\.5 \(float\)"),
    ({"seq_len": True}, r"'seq_len' in c\.toml: expected int, got True \(bool\)"),  # bool is not an int
    ({"compile": 1}, r"'compile' in c\.toml: expected bool, got 1 \(int\)"),
    ({"optimizer": {"lr": False}}, r"'optimizer\.lr' in c\.toml: expected float, got False"),
    ({"optimizer": {"lr": "fast"}}, r"'optimizer\.lr' in c\.toml: expected float, got 'fast'"),
    ({"model": {"path": 3}}, r"'model\.path' .* expected str, got 3 \(int\) \(to give a string, quote it: \"3"),
    ({"model": "llama"}, r"'model' in c\.toml: expected a table of ModelSection keys, got 'llama'"),
    ({"model": {"revision": 2}}, r"'model\.revision' in c\.toml: expected str \| None, got 2"),
    ({"max_steps": "ten"}, r"'max_steps' in c\.toml: expected int \| None, got 'ten'"),
    ({"peft": {"targets": "q_proj"}}, r"'peft\.targets' in c\.toml: expected tuple\[str, \.\.\.\], got 'q_proj'"),
    ({"peft": {"targets": ["q_proj", 7]}}, r"'peft\.targets\[1\]' in c\.toml: expected str, got 7"),
    ({"peft": {"modules_to_save": [1]}}, r"'peft\.modules_to_save\[0\]' in c\.toml: expected str, got 1"),
    ({"optimizer": {"betas": [0.9]}}, r"'optimizer\.betas' in c\.toml: expected tuple\[float, float\] \(2 items\)"),
    ({"tags": {"a": 1}}, r"'tags\.a' in c\.toml: expected str, got 1"),
    ({"tags": ["a"]}, r"'tags' in c\.toml: expected dict\[str, str\], got \['a'\]"),
])
def test_wrong_types_name_key_type_and_value(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_dict(SFTConfig, data, source="c.toml")


def test_literal_lists_allowed_values_and_suggests():
    with pytest.raises(ConfigError, match=r"'peft\.method' in c\.toml: expected one of 'none', 'lora', 'dora', "
                                          r"'qlora', got 'lorra' \(str\); did you mean 'lora'\?"):
        from_dict(SFTConfig, {"peft": {"method": "lorra"}}, source="c.toml")
    with pytest.raises(ConfigError, match=r"'model\.dtype' .* expected one of 'fp32', 'bf16', 'fp16', got 16"):
        from_dict(SFTConfig, {"model": {"dtype": 16}}, source="c.toml")
    assert from_dict(SFTConfig, {"peft": {"method": "qlora"}}, source="c.toml").peft.method == "qlora"


def test_validators_run_and_name_the_key():
    with pytest.raises(ConfigError, match=r"invalid value for 'optimizer\.lr' in c\.toml: must be > 0, got -1\.0"):
        from_dict(SFTConfig, {"optimizer": {"lr": -1}}, source="c.toml")


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key 'name' in r\.toml"):
        from_dict(Required, {"count": 2}, source="r.toml")
    assert from_dict(Required, {"name": "x"}, source="r.toml") == Required("x")


# -- overrides ---------------------------------------------------------------------------------------


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "peft.targets=[q_proj,v_proj]", "compile=true", "model.path=/x"]) == {
        "a": {"b": 1}, "peft": {"targets": ["q_proj", "v_proj"]}, "compile": True, "model": {"path": "/x"}}
    assert parse_overrides([
        "lr=1e-4", "x=-3", "s=\"quoted 1\"", "t='1'", "data.path=org/name", "p=/x/y", "e=", "f=false",
        "l=[1, 2.5, \"a b\", c]", "n=[]", "tbl={a = 1}", "d=2024-01-01", "sp = spaced ", "nested=[[a,b],[1]]",
    ]) == {"lr": 1e-4, "x": -3, "s": "quoted 1", "t": "1", "data": {"path": "org/name"}, "p": "/x/y", "e": "",
           "f": False, "l": [1, 2.5, "a b", "c"], "n": [], "tbl": {"a": 1}, "d": "2024-01-01", "sp": "spaced",
           "nested": [["a", "b"], [1]]}
    assert parse_overrides(["a.b=1", "a.c=2", "a.b=3"]) == {"a": {"b": 3, "c": 2}}
    assert parse_overrides(["url=http://h/x?a=b"]) == {"url": "http://h/x?a=b"}  # split on the first '='


@pytest.mark.parametrize("bad", ["seq_len", "=3", "a..b=1", "a b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="malformed override " + repr(bad).replace(".", r"\.")):
        parse_overrides([bad])


def test_conflicting_overrides():
    with pytest.raises(ConfigError, match="conflicts with the earlier override of 'a'"):
        parse_overrides(["a=1", "a.b=2"])


def test_deep_merge():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}
    assert deep_merge(base, {"a": {"c": {"x": 3}}, "e": [2]}) == {"a": {"b": 1, "c": {"d": 2, "x": 3}}, "e": [2]}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "e": [1]}  # not modified


# -- files -------------------------------------------------------------------------------------------


@pytest.fixture
def builtin(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "demo.toml").write_text('# A tiny demo run.\nseq_len = 64\n\n[model]\npath = "/models/tiny"\n')
    (folder / "llama3_2_1b_lora.toml").write_text(
        '# Llama 3.2 1B with LoRA on the attention projections.\n# second line\n'
        'extends = "demo"\nseq_len = 2048\n\n[peft]\nmethod = "lora"\nrank = 16\n')
    (folder / "nodesc.toml").write_text("seq_len = 1\n# not a description\n")
    (folder / "README.md").write_text("not a config")
    return folder


def test_builtin_configs_and_descriptions(builtin):
    found = builtin_configs(builtin)
    assert list(found) == ["demo", "llama3_2_1b_lora", "nodesc"]
    assert found["demo"].description == "A tiny demo run."
    assert found["llama3_2_1b_lora"].description == "Llama 3.2 1B with LoRA on the attention projections."
    assert found["nodesc"].description == ""
    assert pathlib.Path(found["demo"]) == builtin / "demo.toml" == found["demo"].path  # usable as a path
    assert builtin_configs(builtin / "missing") == {}


def test_load_builtin_by_name_with_extends_and_overrides(builtin):
    cfg, resolved = load_config(SFTConfig, "demo", builtin_dir=builtin)
    assert cfg == SFTConfig(model=ModelSection(path="/models/tiny"), seq_len=64)
    assert resolved == to_dict(cfg) and resolved["peft"]["targets"] == ["q_proj", "v_proj"]

    cfg, _ = load_config(SFTConfig, "llama3_2_1b_lora", ["peft.targets=[q_proj,k_proj]", "optimizer.lr=2e-4",
                                                          "model.dtype=bf16"], builtin_dir=builtin)
    assert cfg.model == ModelSection(path="/models/tiny", dtype="bf16")  # inherited from demo, then overridden
    assert cfg.seq_len == 2048 and cfg.peft == PeftSection(method="lora", rank=16, targets=("q_proj", "k_proj"))
    assert cfg.optimizer.lr == 2e-4

    cfg, _ = load_config(SFTConfig, "demo", {"compile": True}, builtin_dir=builtin)  # overrides as a dict
    assert cfg.compile is True


def test_load_path_and_extends_from_a_user_file(builtin, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "llama3_2_1b_lora"\n[peft]\nrank = 4\n')
    cfg, _ = load_config(SFTConfig, str(path), builtin_dir=builtin)
    assert cfg.seq_len == 2048 and cfg.peft.rank == 4 and cfg.peft.method == "lora" and cfg.model.path == "/models/tiny"
    with pytest.raises(ConfigError, match="no built-in config named 'llama3_2_1b_lora'.* Available: \\(none\\)"):
        load_config(SFTConfig, path, builtin_dir=None)  # a PathLike works; a name needs builtin_dir
    (tmp_path / "child.toml").write_text('extends = "mine.toml"\nseq_len = 7\n')  # a path: relative to the file
    cfg, _ = load_config(SFTConfig, tmp_path / "child.toml", builtin_dir=builtin)
    assert cfg.seq_len == 7 and cfg.peft.rank == 4


def test_missing_builtin_lists_close_matches_and_names(builtin):
    with pytest.raises(ConfigError, match=r"no built-in config named 'llama3_2_1b_lor'; did you mean "
                                          r"'llama3_2_1b_lora'\? Available: demo, llama3_2_1b_lora, nodesc"):
        load_config(SFTConfig, "llama3_2_1b_lor", builtin_dir=builtin)
    with pytest.raises(ConfigError, match="config file not found: .*nope.toml"):
        load_config(SFTConfig, "nope.toml", builtin_dir=builtin)
    with pytest.raises(ConfigError, match=r"a built-in config is named without \.toml: 'demo'"):
        load_config(SFTConfig, "demo.toml", builtin_dir=builtin)


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('seq_len = 3\n\n[model]\npath = "/x\n')
    with pytest.raises(ConfigError, match=r"TOML syntax error in .*broken\.toml:4: .*line 4"):
        load_config(SFTConfig, str(path), builtin_dir=None)


def test_errors_name_the_layer_the_key_came_from(builtin, tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('extends = "demo"\n[optimizer]\nlr = 1e-3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.lrr' in override 'optimizer\.lrr=1'; "
                                          r"did you mean 'optimizer\.lr'\?"):
        load_config(SFTConfig, str(path), ["optimizer.lrr=1"], builtin_dir=builtin)
    path.write_text('extends = "demo"\n[optimizer]\nlrr = 1e-3\n')
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.lrr' in .*my\.toml; did you mean 'optimizer\.lr'"):
        load_config(SFTConfig, str(path), builtin_dir=builtin)
    (builtin / "demo.toml").write_text('seq_len = "long"\n')
    with pytest.raises(ConfigError, match=r"'seq_len' in .*configs/demo\.toml: expected int"):
        load_config(SFTConfig, str(path), ["optimizer.lr=1"], builtin_dir=builtin)
    with pytest.raises(ConfigError, match=r"'seq_len' in override 'seq_len=1\.5': expected int"):
        load_config(SFTConfig, "demo", ["seq_len=1.5"], builtin_dir=builtin)


def test_extends_errors(builtin):
    (builtin / "a.toml").write_text('extends = "b"\n')
    (builtin / "b.toml").write_text('extends = "a"\n')
    (builtin / "c.toml").write_text("extends = 3\n")
    with pytest.raises(ConfigError, match=r"config inheritance loop: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_config(SFTConfig, "a", builtin_dir=builtin)
    with pytest.raises(ConfigError, match=r"'extends' in .*c\.toml: expected the name of a built-in config"):
        load_config(SFTConfig, "c", builtin_dir=builtin)


# -- writing -----------------------------------------------------------------------------------------


def test_round_trip_to_toml_and_back(tmp_path):
    cfg = SFTConfig(
        model=ModelSection(path='C:\\models\\"tiny"\n', dtype="bf16", revision="main"), seq_len=1024, compile=True,
        peft=PeftSection(method="dora", rank=4, alpha=8.0, targets=("q_proj", "o_proj"), modules_to_save=[]),
        optimizer=OptimizerSection(lr=3e-5, betas=(0.9, 0.95)), tags={"key with space": "ü", "b": ""},
        max_steps=10, output=pathlib.Path("runs/x"))
    text = to_toml(cfg, header="resolved config\nof a test run")
    assert text.startswith("# resolved config\n# of a test run\n")
    assert tomllib.loads(text) == to_dict(cfg)
    path = tmp_path / "resolved.toml"
    path.write_text(text, encoding="utf-8")
    loaded, resolved = load_config(SFTConfig, str(path), builtin_dir=None)
    assert loaded == cfg and resolved == to_dict(cfg)
    # defaults (None left out of the TOML, empty tables, empty lists) come back equal too
    path.write_text(to_toml(SFTConfig()))
    assert load_config(SFTConfig, str(path), builtin_dir=None)[0] == SFTConfig()


def test_to_toml_values():
    data = {"i": -3, "f": 1e-05, "big": 1e300, "inf": math.inf, "ninf": -math.inf, "b": False, "s": "tab\there\x01",
            "l": [1, "a", [True]], "mixed": [{"a": 1}, {"b": [2]}], "t": {"u": {"v": 1}, "w": 2}, "e": {},
            "dotted.key": 1, "skip": None}
    back = tomllib.loads(to_toml(data))
    assert back == {k: v for k, v in data.items() if k != "skip"}
    assert math.isnan(tomllib.loads(to_toml({"n": math.nan}))["n"])
    # None is left out of tables inside arrays too; inside an array it cannot be written.
    assert tomllib.loads(to_toml({"rows": [{"a": 1, "b": None}]})) == {"rows": [{"a": 1}]}
    with pytest.raises(TypeError, match="cannot write"):
        to_toml({"x": object()})
    with pytest.raises(TypeError, match="cannot write.*NoneType"):
        to_toml({"x": [1, None]})
