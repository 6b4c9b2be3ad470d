"""Shape-only stand-ins (soe/plugin/stand_in.py): `soe inspect` prints exactly what building the models on meta
prints, for every preset of the families that offer one and every shipped recipe, and imports none of
the model libraries (diffusers, timm, peft, transformers, Lightning) on a first run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AceStepTransformer1DModel, StableAudioDiTModel, WanTransformer3DModel

from soe import get_expert, list_experts
from soe.cli.cache import table_to_json
from soe.cli.tables import recipe_tables
from soe.experts.ace_step import MODEL_DEFAULTS as ACE_DEFAULTS
from soe.experts.ace_step_15 import MODEL_DEFAULTS as ACE_15_DEFAULTS
from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel
from soe.experts.stable_audio import STABLE_AUDIO_OPEN_1_0
from soe.experts.wan import WAN_MODEL_DEFAULTS
from soe.plugin.stand_in import constructor_defaults, differences, shapes_only
from soe.recipe.builders import build_stand_in
from soe.recipe.reading import load_recipe, shipped_recipes
from soe.schema import ConnectorConfig
from soe.stitch.connector import Connector

ROOT = Path(__file__).parents[1]
WITH_STAND_IN = [(name, preset) for name in list_experts() for preset in get_expert(name).presets
                 if get_expert(name).stand_in(dict(get_expert(name).presets[preset])) is not None]


def test_the_families_copies_of_the_model_defaults_are_the_models():
    assert WAN_MODEL_DEFAULTS == constructor_defaults(WanTransformer3DModel)
    assert ACE_DEFAULTS == constructor_defaults(ACEStepTransformer2DModel)
    assert ACE_15_DEFAULTS == constructor_defaults(AceStepTransformer1DModel)
    assert STABLE_AUDIO_OPEN_1_0 == constructor_defaults(StableAudioDiTModel)


def test_every_builtin_family_offers_stand_ins_for_every_preset():
    assert {n for n, _ in WITH_STAND_IN} >= {"wan2.1", "wan2.2-ti2v", "ace-step", "ace-step-1.5", "stable-audio-open"}
    assert ("wan2.1", "1.3b") in WITH_STAND_IN and ("ace-step", "3.5b") in WITH_STAND_IN


@pytest.mark.parametrize("name,preset", WITH_STAND_IN)
def test_a_stand_in_equals_the_model_built_on_meta(name, preset):
    cls = get_expert(name)
    with torch.device("meta"):
        real = cls.from_preset(preset, device="meta")
    stand_in = cls.stand_in(dict(cls.presets[preset]))
    assert differences(stand_in, real) == []
    assert sum(p.numel() for p in stand_in.parameters()) == sum(p.numel() for p in real.parameters())


def test_differences_name_what_disagrees():
    cls = get_expert("wan2.1")
    with torch.device("meta"):
        real = cls.from_preset("tiny", device="meta")
    wider = cls.stand_in({**cls.presets["tiny"], "ffn_dim": 96})
    found = differences(wider, real)
    assert any(f.startswith("parameters: stand-in") for f in found) and any("config differs at ['ffn_dim']" in f for f in found)
    assert any("block 0: parameter shapes differ" in f and "ffn.net.0.proj.weight" in f for f in found)


TINY = ROOT / "tests" / "recipes" / "tiny.yaml"
VARIANTS = {  # beyond the shipped recipes: the other family, train modes, connector MLPs, depth and k/v injection
    "stable-audio": (TINY, ["experts.b.name=stable-audio-open", "experts.b.train=full", "stitch.connector.mlp=swiglu"]),
    "glu-frozen-depth": (TINY, ["experts.a.train=frozen", "stitch.connector.mlp=glu", "stitch.connector.pool=moments",
                                "stitch.connector.input_norm=true", "stitch.depth.mode=insert_interpolated", "stitch.pairs=identity"]),
    "lora-targets-outside-blocks": (TINY, ["experts.a.lora.targets=[proj_out, 'blocks\\.\\d+\\.attn1\\.to_q']"]),
    "universe1-full": (ROOT / "recipes" / "universe1.yaml", ["experts.a.train=full", "experts.b.lora.r=16",
                                                               "experts.b.architecture.num_layers=20", "stitch.depth.every=null"]),
}
RECIPES = {**{p.stem: (p, []) for p in sorted(shipped_recipes().values())}, "tiny": (TINY, []), **VARIANTS}


@pytest.mark.parametrize("case", RECIPES)
def test_inspect_prints_the_same_tables_with_stand_ins(case):
    recipe, overrides = RECIPES[case]
    cfg = load_recipe(recipe, overrides)
    for side in ("a", "b"):  # the families that offer stand-ins do build them here (not silently the model)
        e = cfg.experts[side]
        custom_lora = e.train == "lora" and (e.lora.targets is not None or e.lora.init_from is not None)  # counted on the model
        assert (build_stand_in(cfg, side) is not None) == ((e.name, e.preset) in WITH_STAND_IN and not custom_lora), side
    with_stand_ins = [table_to_json(t) for t in recipe_tables(cfg)]
    built = [table_to_json(t) for t in recipe_tables(load_recipe(recipe, overrides), stand_ins=False)]
    assert with_stand_ins == built


@pytest.mark.parametrize("mlp", ["mlp", "glu", "swiglu"])
@pytest.mark.parametrize("pool,input_norm", [("mean", False), ("moments", True)])
def test_connector_stand_ins_have_timms_names_and_shapes(mlp, pool, input_norm):
    spec = ConnectorConfig(mlp=mlp, pool=pool, input_norm=input_norm)
    real = Connector(48, 32, spec, device="meta")
    with shapes_only():
        stand_in = Connector(48, 32, spec, device="meta")
    assert type(stand_in.mlp) is not type(real.mlp)
    assert {n: p.shape for n, p in stand_in.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert stand_in.mlp.fc2.in_features == real.mlp.fc2.in_features


def _run(args, modules):
    code = ("import sys, contextlib, io\nfrom soe.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({args!r}) == 0\n"
            f"print(sorted(m for m in {modules!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().replace("'", '"'))


# torch._dynamo (~1.4 s): the lockstep engine's hooks and KVProcessor.lookup are kept out of compiled graphs only when
# soe compiles (soe.sample.speed.compile_blocks), not when a stitch is built
HEAVY = ("diffusers", "timm", "torchvision", "peft", "transformers", "lightning", "accelerate", "torch._dynamo")


def test_a_first_inspect_of_universe1_imports_no_model_library():
    assert _run(["inspect", str(ROOT / "recipes" / "universe1.yaml"), "--no-cache"], HEAVY) == []


def test_a_first_listing_imports_no_torch_and_no_plugin():
    plugins = tuple(f"soe.experts.{m}" for m in ("wan", "wan22", "ace_step", "ace_step_15", "stable_audio"))
    assert _run(["experts", "--no-cache"], ("torch", "numpy", "soe.plugin.registry", *HEAVY, *plugins)) == []


def test_the_contract_check_fails_on_a_stand_in_that_drifts():
    from soe.experts.wan import WanExpert
    from soe.testing import run_check

    class DriftingStandIn(WanExpert):
        presets = {"tiny": WanExpert.presets["tiny"]}

        @classmethod
        def stand_in(cls, config):
            return super().stand_in({**config, "ffn_dim": config["ffn_dim"] * 2})

    assert run_check("meta_presets", WanExpert).detail.endswith("stand-ins equal for 1.3b, 14b, tiny")
    result = run_check("meta_presets", DriftingStandIn)
    assert not result.passed and "preset 'tiny': the stand-in differs from the model" in result.detail and "ffn_dim" in result.detail
