"""One typed contract end to end: a misspelt key or a wrongly typed knob value is a
one-line error naming it (and the nearest valid key), in YAML, in flat dicts, in space
files, and through the command line before anything heavy starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from analysis.runs import AnalysisError
from search.space import SearchSpace, SpaceError, load_space
from trainers.contracts import UserError
from trainers.data import DataConfig, DataError
from trainers.experiment import (
    ConfigError,
    ExperimentConfig,
    experiment_from_flat,
    load_experiment,
)

GOOD: dict[str, Any] = {
    "model": {"block": "wukong", "d_model": 16, "n_tokens": 4, "wukong": {"k": 4}},
    "train": {"lr": 0.003, "batch_size": 128},
    "data": {"name": "synthetic", "synthetic": {"n_rows": 3000}},
}

# (a misspelt key in nested YAML form, its dotted name, the suggestion)
MISSPELT = [
    ({"trian": {"lr": 0.1}}, "trian.lr", "train.lr"),
    ({"modle": {"d_model": 32}}, "modle.d_model", "model.d_model"),
    ({"train": {"lrr": 0.1}}, "train.lrr", "train.lr"),
    ({"model": {"wukong": {"kk": 8}}}, "model.wukong.kk", "model.wukong.k"),
    ({"dta": {"name": "synthetic"}}, "dta.name", "data.name"),
    ({"data": {"synthetic": {"n_row": 10}}}, "data.synthetic.n_row", "data.synthetic.n_rows"),
]
IDS = [m[1] for m in MISSPELT]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_good_config_loads(tmp_path: Path) -> None:
    f = tmp_path / "best.yaml"
    f.write_text(yaml.safe_dump(GOOD))
    exp = load_experiment(f)
    assert exp.model.mixer.k == 4 and exp.train.lr == 0.003  # type: ignore[attr-defined]
    assert experiment_from_flat(exp.flat()) == exp


@pytest.mark.parametrize(("extra", "key", "nearest"), MISSPELT, ids=IDS)
def test_a_misspelt_yaml_key_names_itself_and_the_nearest(
        tmp_path: Path, extra: dict[str, Any], key: str, nearest: str) -> None:
    f = tmp_path / "best.yaml"
    f.write_text(yaml.safe_dump(_merge(GOOD, extra)))
    with pytest.raises(ConfigError) as err:
        load_experiment(f)
    assert str(err.value) == f"{f}: unknown key {key!r} (did you mean {nearest!r}?)"


@pytest.mark.parametrize(("extra", "key", "nearest"), MISSPELT, ids=IDS)
def test_a_misspelt_flat_key_names_itself_and_the_nearest(
        extra: dict[str, Any], key: str, nearest: str) -> None:
    flat = {**_flat(GOOD), **_flat(extra)}
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' \(did you mean '{nearest}'\?\)"):
        experiment_from_flat(flat)


def test_a_key_with_no_near_name_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' \(valid here: model, train, data"):
        experiment_from_flat({"model.block": "wukong", "zzz": 1})


def test_a_trial_sample_with_data_passed_apart_trains_that_data() -> None:
    data = DataConfig(name="synthetic")
    exp = experiment_from_flat({"model.block": "tokenmixer", "train.lr": 0.01}, data)
    assert exp.data == data and exp.train.lr == 0.01


def test_user_errors_share_one_base() -> None:
    for cls in (ConfigError, SpaceError, DataError, AnalysisError):
        assert issubclass(cls, UserError)


def test_train_cli_reports_a_misspelt_key_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recscale.cli import main

    bad = tmp_path / "best.yaml"
    bad.write_text(yaml.safe_dump(_merge(GOOD, {"trian": {"lr": 0.1}})))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == f"recscale: error: {bad}: unknown key 'trian.lr' (did you mean 'train.lr'?)\n"


# ---- space files: every value checked at load ----------------------------------------

BAD_VALUES = [
    ("model: {n_layers: two}", "model.n_layers: 'two' is not an integer"),
    ('model: {n_layers: {choice: [1, "two"]}}', "model.n_layers: choice[1] 'two' is not an integer"),
    ('model: {d_model: {choice: [16, "sixteen"]}}',
     "model.d_model: choice[1] 'sixteen' is not an integer"),
    ('model: {d_model: {choice: [16, "16"]}}', "model.d_model: choice[1] '16' is not an integer"),
    ("model: {n_layers: {float: [1.0, 3.0]}}",
     "model.n_layers: a float range on an integer knob; use {int: [lo, hi]}"),
    ("model: {n_layers: {int: [1, 99]}}", "model.n_layers: int[1] 99 should be less than or equal to 64"),
    ("model: {tokenizer: {choice: [grouped, words]}}",
     "model.tokenizer: choice[1] 'words' should be 'grouped' or 'field'"),
    ("model: {head_hidden: {choice: [[64], [64, x]]}}",
     "model.head_hidden: choice[1] [64, 'x']: item 1 is not an integer"),
    ("train: {lr: fast}", "train.lr: 'fast' is not a number"),
    ("train: {lr: {choice: [0.01, fast]}}", "train.lr: choice[1] 'fast' is not a number"),
    ("train: {lr: -0.1}", "train.lr: -0.1 should be greater than 0"),
    ("train: {lr: {float: [-0.1, 0.1]}}", "train.lr: float[0] -0.1 should be greater than 0"),
    ("train: {batch_size: {choice: [true, 64]}}", "train.batch_size: choice[0] True is not an integer"),
    ("blocks: {tokenmixer: {ffn_mult: {choice: [1, two]}}}",
     "blocks.tokenmixer.ffn_mult: choice[1] 'two' is not an integer"),
]


@pytest.mark.parametrize(("body", "message"), BAD_VALUES, ids=[b[1].split(":")[0] + "/" + b[0]
                                                               for b in BAD_VALUES])
def test_a_wrongly_typed_knob_value_is_a_space_error_at_load(
        tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(f"families: [tokenmixer]\n{body}\n")
    with pytest.raises(SpaceError) as err:
        load_space(f)
    assert str(err.value) == f"{f}: {message}"


def test_well_typed_values_load() -> None:
    """An int range on a float knob is fine; ``None`` fits an optional knob; lists fit
    tuple knobs."""
    space = SearchSpace(families=["tokenmixer"],
                        model={"n_tokens": {"choice": [None, 4]},
                               "head_hidden": {"choice": [[64], [128, 64]]}},
                        train={"epochs": {"int": [1, 3]}, "lr": {"float": [1e-4, 1e-2], "log": True}})
    assert set(space.dimensions()) == {"model.block", "model.n_tokens", "model.head_hidden",
                                       "train.epochs", "train.lr"}


def test_a_misspelt_space_knob_names_the_nearest(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text("families: [tokenmixer]\ntrain: {lrr: 0.1}\n")
    with pytest.raises(SpaceError, match=r"train\.lrr is not a training knob \(did you mean 'lr'\?\)"):
        load_space(f)


@pytest.mark.parametrize("body", ["model: {n_layers: two}", "train: {lr: {float: [1.0, 0.1]}}"])
def test_search_cli_rejects_a_bad_space_in_one_line_before_ray_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        body: str) -> None:
    import ray

    from recscale.cli import main

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"families: [tokenmixer]\n{body}\n")
    code = main(["search", "--space", str(bad), "--data", "synthetic", "--budget-flops", "1e9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"recscale: error: {bad}: "), err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "recscale_runs").exists()


def test_every_value_of_an_exported_config_round_trips(tmp_path: Path) -> None:
    exp = ExperimentConfig(**GOOD)
    exp.to_yaml(tmp_path / "e.yaml")
    assert load_experiment(tmp_path / "e.yaml") == exp


def test_light_precheck_knows_the_experiment_sections(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """trainers.config_io checks sections without model code; they must be the config's."""
    from trainers.config_io import EXPERIMENT_SECTIONS, precheck_experiment
    from trainers.experiment import ExperimentConfig

    monkeypatch.setenv("RECSCALE_CACHE", str(tmp_path / "empty-cache"))  # no schema cached

    assert set(EXPERIMENT_SECTIONS) == set(ExperimentConfig.model_fields)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {block: wukong}\ntrian: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian.lr' \(did you mean 'train.lr'\?\)"):
        precheck_experiment(bad)
    good = tmp_path / "good.yaml"
    good.write_text("model: {block: wukong, d_modle: 3}\n")
    precheck_experiment(good)  # without a cached schema, nested keys are left to load_experiment


def test_a_nested_typo_is_refused_without_torch_once_the_schema_is_cached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load of an experiment caches the key schema; the next command checks
    nested keys with it before any model code (torch) is imported."""
    import subprocess
    import sys

    from trainers.config_io import cached_key_schema
    from trainers.experiment import ExperimentConfig, key_schema, load_experiment

    monkeypatch.setenv("RECSCALE_CACHE", str(tmp_path / "cache"))
    good = tmp_path / "good.yaml"
    good.write_text("model: {block: wukong}\n")
    assert cached_key_schema() is None
    load_experiment(good)
    assert cached_key_schema() == key_schema(ExperimentConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {block: tokenmixer, d_modle: 16}\n")
    probe = ("import sys\nfrom trainers.config_io import precheck_experiment\n"
             "try:\n    precheck_experiment(sys.argv[1])\nexcept Exception as e:\n    print(e)\n"
             "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True,
                         env={**os.environ, "RECSCALE_CACHE": str(tmp_path / "cache")}, check=True)
    message, torch_loaded = out.stdout.strip().splitlines()
    assert "unknown key 'model.d_modle' (did you mean 'model.d_model'?)" in message
    assert torch_loaded == "False"
