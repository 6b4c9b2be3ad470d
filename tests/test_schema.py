"""Each recipe option is declared once: the dataclasses the code takes are the OmegaConf schema."""
import dataclasses
import json
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import soe.schema as schema
from soe.cli import main
from soe.recipe.reading import load_recipe
from soe.schema import Choice, ConnectorConfig, Recipe, RecipeError, StitchConfig, build

TINY = Path(__file__).parent / "recipes" / "tiny.yaml"


def _choice_fields(cls, prefix=""):
    """(dotted key, Choice class) of every choice in the schema below ``cls`` (lists and dicts of sections skipped)."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp) if typing.get_origin(tp) is typing.Union else tp
        if isinstance(tp, type) and issubclass(tp, Choice):
            yield f"{prefix}{f.name}", tp
        elif dataclasses.is_dataclass(tp):
            yield from _choice_fields(tp, f"{prefix}{f.name}.")


CHOICES = list(_choice_fields(Recipe))


def test_the_schema_has_the_choices_the_code_branches_on():
    keys = dict(CHOICES)
    assert {"stitch.direction", "stitch.engine", "stitch.connector.mlp", "flow.timesteps", "trainer.on_nonfinite",
            "experts.a.dtype", "experts.a.storage_dtype", "sample.memory", "sample.scheduler"} <= set(keys)
    assert keys["sample.memory"] is schema.sample.Memory  # the sample section is a SpeedConfig ...
    assert issubclass(schema.SampleConfig, schema.SpeedConfig) and issubclass(schema.SampleConfig, schema.SamplerConfig)


@pytest.mark.parametrize("key, names", [(k, c) for k, c in CHOICES], ids=[k for k, _ in CHOICES])
def test_a_name_outside_a_choice_fails_the_same_way_from_a_recipe_and_from_code(key, names):
    expected = f"expected one of {names.names()}, got 'bogus'"
    with pytest.raises(RecipeError) as from_recipe:
        load_recipe(TINY, [f"{key}=bogus"])
    assert str(from_recipe.value) == f"{key}: {expected}"
    section, _, leaf = key.rpartition(".")
    cls = OmegaConf.get_type(OmegaConf.select(OmegaConf.structured(Recipe), section)) if section else Recipe
    with pytest.raises(RecipeError) as from_code:  # the dataclass the code constructs checks the same names
        build(cls, {leaf: "bogus"}, section)
    assert str(from_code.value).startswith(f"{key}: expected") and "'bogus'" in str(from_code.value)


def test_errors_name_the_full_key_of_nested_options():
    inject = {"b_to_a": {"mode": "attention_kv", "targets": [{"attention": "attn2", "rope": "spiral"}]}}
    with pytest.raises(RecipeError, match=r"^stitch\.inject\.b_to_a\.targets\.0\.rope: expected one of \['none', 'complex', 'cat'\], got 'spiral'$"):
        build(StitchConfig, {"inject": inject}, "stitch")
    with pytest.raises(RecipeError, match=r"^stitch\.connector\.hidden: expected a positive integer"):
        build(StitchConfig, {"connector": {"hidden": 0}}, "stitch")
    with pytest.raises(RecipeError, match=r"^connector\.colour: not an option of ConnectorConfig"):
        build(ConnectorConfig, {"colour": "red"}, "connector")


def test_choices_read_and_print_as_their_names(tmp_path):
    cfg = load_recipe(TINY, ["flow.timesteps=independent", "stitch.connector.init=trunc_normal"])
    t = cfg.flow.timesteps
    assert t == "independent" and f"{t}" == "independent" and repr(t) == "'independent'" and json.dumps(t) == '"independent"'
    OmegaConf.save(cfg, tmp_path / "r.yaml")
    assert "timesteps: independent" in (tmp_path / "r.yaml").read_text()
    assert load_recipe(tmp_path / "r.yaml") == cfg  # the saved recipe of a run reads back equal (resume compares them)


def test_the_stitcher_takes_the_recipe_dataclass():
    from soe.recipe.builders import build_stitcher, recipe_options

    cfg = load_recipe(TINY, ["stitch.connector.init=trunc_normal", "stitch.connector.input_norm=true"])
    st = build_stitcher(cfg)
    assert type(st.spec) is ConnectorConfig and st.spec == recipe_options(cfg).stitch.connector
    assert OmegaConf.get_type(cfg.stitch.connector) is ConnectorConfig  # one class: the schema node and the code's option


@pytest.mark.parametrize("stand_ins", [True, False])
def test_inspect_builds_each_expert_once(monkeypatch, capsys, stand_ins):
    """`soe inspect` reuses the experts validation built (shape-only stand-ins, soe/plugin/stand_in.py, or
    models on the meta device for families without one) to learn their depth."""
    from soe.plugin.expert import Expert
    from soe.plugin.registry import get_expert

    cfg = load_recipe(TINY)
    calls = []
    for side in ("a", "b"):
        cls = get_expert(cfg.experts[side].name)
        for how in ("from_preset", "stand_in"):
            original = getattr(cls, how).__func__ if how == "from_preset" or stand_ins else Expert.stand_in.__func__
            monkeypatch.setattr(cls, how, classmethod(lambda c, *a, _f=original, _h=how, **k: calls.append((_h, c.name)) or _f(c, *a, **k)))
    assert main(["inspect", str(TINY), "--no-cache"]) == 0
    assert "block pairs" in capsys.readouterr().out
    built = [("stand_in", n) for n in (cfg.experts.a.name, cfg.experts.b.name)]
    if not stand_ins:  # the families offer none: each is asked once, then built once
        built += [("from_preset", n) for n in (cfg.experts.a.name, cfg.experts.b.name)]
    assert sorted(calls) == sorted(built), calls


def test_two_attention_targets_joining_one_pre_norm_is_one_recipe_line(capsys):
    """Each pre_norm takes one target's injected tokens (a second join would hook the module twice)."""
    universe1 = Path(__file__).parents[1] / "recipes" / "universe1.yaml"
    assert main(["inspect", str(universe1), "stitch.inject.b_to_a.targets.1.pre_norm=norm1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stitch.inject.b_to_a.targets.1.pre_norm: 'norm1' already takes the injected tokens of targets.0; "
                   "give each target its own pre_norm (or null)"], err
    targets = [{"attention": "attn1", "pre_norm": "norm1"}, {"attention": "attn2", "pre_norm": None}]
    build(StitchConfig, {"inject": {"b_to_a": {"mode": "attention_kv", "targets": targets}}}, "stitch")  # distinct: fine
