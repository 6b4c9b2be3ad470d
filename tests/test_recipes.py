"""Every shipped recipe validates and inspects; bad recipes fail with one clear line and exit 2."""
import textwrap
from pathlib import Path

import pytest
import torch

from soe.cli import main
from soe.recipe.reading import load_recipe
from soe.recipe.validate import validate_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
DEMO = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_inspects_on_meta(recipe, capsys):
    cfg = load_recipe(recipe)
    validate_recipe(cfg, check_paths=False)
    assert main(["inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "block pairs" in out and cfg.experts.a.name in out


def test_universe1_is_the_paper_setup():
    cfg = load_recipe(RECIPES[[p.name for p in RECIPES].index("universe1.yaml")])
    from soe.recipe.builders import build_stitcher

    with torch.device("meta"):
        st = build_stitcher(cfg, device="meta", load_weights=False)
    assert (st.a.name, st.a.num_blocks, st.a.hidden_size) == ("wan2.1", 30, 1536)
    assert (st.b.name, st.b.num_blocks, st.b.hidden_size) == ("ace-step", 24, 2560)
    assert st.a.token_rate == st.b.token_rate == 6.25  # both sides at 6.25 latent frames per second
    c = st.connector_for("b_to_a", st.pairs[0][0])
    assert (c.mlp.fc1.in_features, c.mlp.fc1.out_features, c.mlp.fc2.out_features) == (2560, 4096, 1536)
    assert st.detach_source and st.direction == "both" and cfg.flow.timesteps == "shared"
    assert cfg.trainer.precision == "bf16-mixed" and cfg.data.seconds == 5.0


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return p


BAD_OVERRIDES = [
    (["experts.a.name=wan9"], "experts.a.name: unknown expert 'wan9'"),
    (["experts.b.preset=huge"], "experts.b.preset: expert 'ace-step-1.5' has no preset 'huge'"),
    (["experts.a.path=/no/such/folder"], "experts.a.path: checkpoint folder not found"),
    (["experts.a.train=half"], "experts.a.train: expected one of"),
    (["experts.a.dtype=float8"], "experts.a.dtype: expected one of"),
    (["experts.a.lora.r=0"], "experts.a.lora.r: expected a positive rank"),
    (["experts.b.lora.dropout=1.5"], "experts.b.lora.dropout"),
    (["experts.a.lora.targets=[nothing_matches_this]"], "experts.a.lora.targets: 'nothing_matches_this' matches no"),
    (["experts.a.options={fps: 25, colour: red}"], "experts.a.options.colour: not an option of expert 'wan2.1'"),
    (["experts.a.flow_shift=-1"], "experts.a.flow_shift: expected a positive shift"),
    (["stitch.pairs=[[0,0],[9,1]]"], "stitch.pairs: depth map pair #1 [9, 1]: block 9 of expert a is out of range 0..3"),
    (["stitch.pairs=[[2,1],[1,2]]"], "stitch.pairs: depth map pair #1 [1, 2]: pairs must be strictly increasing"),
    (["stitch.pairs={every: 0}"], "stitch.pairs: depth map 'every': expected a positive integer"),
    (["stitch.direction=up"], "stitch.direction: expected one of"),
    (["stitch.engine=hooks"], "stitch.engine: 'hooks' runs one-way stitches only"),
    (["stitch.connector.mlp=kan"], "stitch.connector.mlp: expected one of"),
    (["stitch.connector.hidden=0"], "stitch.connector.hidden: expected a positive integer"),
    (["stitch.connector.pool=max"], "stitch.connector.pool: expected one of"),
    (["flow.timesteps=sometimes"], "flow.timesteps: expected one of"),
    (["flow.balance_momentum=1.5"], "flow.balance_momentum"),
    (["data.kind=latents"], "data.path: 'latents' data needs the folder"),
    (["data.kind=latents", "data.path=/no/cache"], "data.path: latent cache folder not found"),
    (["data.batch_size=0"], "data.batch_size: expected a positive integer"),
    (["data.seconds=-2"], "data.seconds: expected a positive clip length"),
    (["optim.lr=0"], "optim.lr: expected a positive finite learning rate"),
    (["optim.betas=[0.9]"], "optim.betas: expected two values"),
    (["trainer.max_steps=-5"], "trainer.max_steps: expected a positive number of steps"),
    (["trainer.max_steps=many"], "trainer.max_steps: Value 'many'"),
    (["trainer.colour=red"], "trainer.colour: Key 'colour' not in 'TrainerConfig'"),
    (["nonsense"], "override 'nonsense': expected key=value"),
    (["resume=true", "run_dir=/tmp/soe-no-such-run-dir"], "resume: no checkpoint to resume from"),
    (["flow.tasks={i2v: 1.0}"], "flow.tasks.i2v: unknown task; expected one of"),
    (["flow.tasks={joint: -1.0}"], "flow.tasks.joint: expected a weight >= 0"),
    (["flow.tasks={joint: 0.0}"], "flow.tasks: the weights sum to 0"),
    (["flow.tasks={joint: often}"], "flow.tasks.joint: Value 'often'"),
    (["flow.tasks={v2a: 1.0}", "experts.a.name=ace-step-1.5"], "flow.tasks.v2a: needs a video expert"),
    (["flow.extend_seconds=-1"], "flow.extend_seconds: expected a positive number of seconds"),
    (["sample.given_uncond=half"], "sample.given_uncond: expected one of"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_recipe_overrides_fail_with_one_line_and_status_2(overrides, message, capsys):
    assert main(["stitch", str(DEMO), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("text, message", [
    ("experts: [1, 2]\n", "experts: "),
    ("name: x\nexperts:\n  a: {preset: tiny}\n", "experts.a.name: Missing mandatory value"),
    ("experts:\n  a: {name: wan2.1}\n  b: {name: ace-step-1.5, preset: tiny}\n", "experts.a: give 'preset'"),
    ("- just\n- a list\n", "must be a mapping"),
    ("key: [unclosed\n", "is not valid YAML"),
], ids=["experts-list", "missing-name", "no-preset-no-path", "list-recipe", "bad-yaml"])
def test_bad_recipe_files(tmp_path, capsys, text, message):
    assert main(["inspect", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_missing_recipe_file(capsys):
    assert main(["stitch", "no/such/recipe.yaml"]) == 2
    assert "recipe: file not found" in capsys.readouterr().err


def test_cli_experts_lists_every_registered_expert(capsys):
    assert main(["experts"]) == 0
    out = capsys.readouterr().out
    for name in ("wan2.1", "ace-step-1.5", "ace-step"):
        assert name in out


def test_universe1_samples_like_the_release():
    cfg = load_recipe(RECIPES[[p.name for p in RECIPES].index("universe1.yaml")])
    s = cfg.sample
    assert (s.scheduler, s.steps, dict(s.shift), dict(s.guidance)) == ("unipc", 35, {"a": 15.0, "b": 15.0}, {"a": 1.2, "b": 5.0})


def test_an_override_reaches_into_a_list_of_the_recipe():
    """`key.N.field=value` sets one field of list element N (it used to end in a TypeError traceback)."""
    universe1 = Path(__file__).parents[1] / "recipes" / "universe1.yaml"
    cfg = load_recipe(universe1, ["stitch.inject.b_to_a.targets.1.rope=cat"])
    assert [t.rope for t in cfg.stitch.inject.b_to_a.targets] == ["none", "cat"]
    assert cfg.stitch.inject.b_to_a.targets[1].attention == "attn2"  # the rest of the element is kept
