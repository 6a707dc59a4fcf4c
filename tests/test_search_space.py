"""Search-space files: every shipped YAML loads; bad files are one-line errors;
define-by-run sampling is conditional on the family and yields valid configs."""

from __future__ import annotations

import optuna
import pytest

from search.space import SearchSpace, SpaceError, bundled_spaces, load_space
from spaces import BlockDimensionError, FeatureSpec, model_cost
from spaces.features import SequenceSpec
from trainers.experiment import ExperimentConfig, experiment_from_flat

# with histories (item field 1), so a space's seq_len knob builds too
SPEC = FeatureSpec(cardinalities=(100, 50, 20, 7, 3, 2, 30, 30), n_numeric=2,
                   sequence=SequenceSpec(item_field=1))
SHIPPED = bundled_spaces()


def test_a_unified_space_and_per_family_spaces_ship() -> None:
    names = {p.stem for p in SHIPPED}
    assert "unified" in names
    assert {"attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite"} <= names
    unified = load_space("spaces/unified.yaml")
    assert set(unified.families) == {"attention", "tokenmixer", "wukong", "unimixing", "unimixing_lite",
                                     "fm"}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_space_loads_and_samples_valid_configs(path) -> None:
    space = load_space(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    valid = 0
    for _ in range(60):
        trial = study.ask()
        flat = space.sample(trial)
        family = flat["model.block"]
        assert family in space.families
        for key in flat:  # only the chosen family's knobs are sampled
            parts = key.split(".")
            if parts[0] == "model" and len(parts) == 3:
                assert parts[1] == family, key
        exp = experiment_from_flat(flat)
        assert isinstance(exp, ExperimentConfig)
        try:
            model_cost(exp.model, SPEC)
            valid += 1
        except BlockDimensionError as err:  # only a width/token split the block cannot use
            assert str(err) and "\n" not in str(err), err
        study.tell(trial, 0.0)
    assert valid >= 30, f"{path.name}: only {valid}/60 sampled configs are buildable"


@pytest.mark.parametrize(("text", "needle"), [
    ("families: [tokenmixer\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mapping"),
    ("families: [hyperformer]\n", "unknown block family 'hyperformer'"),
    ("families: [tokenmixer]\nmodel: {d_modle: {choice: [8]}}\n", "model.d_modle is not a model knob"),
    ("families: [tokenmixer]\nblocks: {wukong: {k: 3}}\n", "blocks.wukong given"),
    ("families: [wukong]\nblocks: {wukong: {kk: 3}}\n", "blocks.wukong.kk is not a wukong knob"),
    ("families: [tokenmixer]\ntrain: {lr: {float: [1.0, 0.1]}}\n", "bad float range"),
    ("families: [tokenmixer]\ntrain: {lrr: 0.1}\n", "train.lrr is not a training knob"),
])
def test_bad_space_files_are_one_line_errors(tmp_path, text: str, needle: str) -> None:
    f = tmp_path / "space.yaml"
    f.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(f)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_is_read_with_the_safe_loader(tmp_path) -> None:
    f = tmp_path / "space.yaml"
    f.write_text("families: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpaceError):
        load_space(f)


def test_constants_are_returned_not_sampled() -> None:
    space = SearchSpace(families=["tokenmixer"], model={"d_model": 32, "n_layers": {"int": [1, 3]}},
                        train={"lr": 0.01})
    study = optuna.create_study()
    trial = study.ask()
    constants = space.suggest(trial)
    assert constants == {"model.d_model": 32, "train.lr": 0.01}
    assert set(trial.params) == {"model.block", "model.n_layers"}


def _random_samples(space: SearchSpace, n: int = 30):
    """``n`` random draws of ``space``: (the trial's Optuna params, the flat config, its
    experiment)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        flat = space.sample(trial)
        yield trial.params, flat, experiment_from_flat(flat, None)
        study.tell(trial, 0.0)


def test_a_knob_the_block_ignores_is_not_sampled() -> None:
    """hstu attention has no FFN: its ffn_mult is never drawn, whatever the YAML order."""
    space = SearchSpace(families=["attention"], model={"d_model": 16, "n_tokens": 4},
                        blocks={"attention": {"ffn_mult": {"choice": [1, 2, 4]},
                                              "kind": {"choice": ["softmax", "hstu"]}}})
    kinds = set()
    for _, flat, exp in _random_samples(space):
        kind = flat["model.attention.kind"]
        kinds.add(kind)
        assert ("model.attention.ffn_mult" in flat) == (kind == "softmax"), flat
        assert exp.model.mixer.kind == kind  # the config still builds, ffn_mult at its default
    assert kinds == {"softmax", "hstu"}


def test_n_tokens_is_not_sampled_with_the_field_tokenizer() -> None:
    """The field tokenizer makes one token per field: n_tokens is left unset (None) then,
    whatever the YAML order, and the config builds with a token per field."""
    space = SearchSpace(families=["fm"], model={"n_tokens": {"choice": [4, 8]}, "d_model": 16,
                                                "tokenizer": {"choice": ["grouped", "field"]}})
    seen = set()
    for params, flat, exp in _random_samples(space):
        tok = flat["model.tokenizer"]
        seen.add(tok)
        assert ("model.n_tokens" in params) == (tok == "grouped"), params
        assert exp.model.tokens_for(SPEC) == (flat["model.n_tokens"] if tok == "grouped"
                                              else SPEC.n_fields)
    assert seen == {"grouped", "field"}
