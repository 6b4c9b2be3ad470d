"""``flow.source_dropout``: a share of training samples whose connectors read nothing (as CFG's unconditional half)."""
from pathlib import Path

import torch

from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.schema import OptimConfig
from soe.train.build import apply_training_setup, build_lora_training, build_objective
from soe.train.module import StitchModule

TINY = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"


def module_for(*overrides) -> StitchModule:
    cfg = load_recipe(TINY, ["data.seconds=1.0", *overrides])
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    return StitchModule(st, build_objective(cfg, st), OptimConfig(), lora_training=build_lora_training(cfg, st))


def test_source_mask_is_a_resume_exact_draw_of_the_given_share_and_none_when_off():
    obj = module_for("flow.source_dropout=0.3").objective
    masks = torch.stack([obj.source_mask(64, step) for step in range(20)])
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert 0.25 < 1 - masks.mean() < 0.35
    torch.testing.assert_close(obj.source_mask(64, 7), masks[7])  # a function of (seed, step, rank) only
    assert not torch.equal(obj.source_mask(64, 7, rank=1), masks[7])
    assert module_for().objective.source_mask(64, 0) is None


def test_the_training_step_hands_the_mask_to_the_stitcher():
    m = module_for("flow.source_dropout=0.5")
    seen = []
    forward = m.stitcher.forward
    m.stitcher.forward = lambda a, b, source_mask=None: seen.append(source_mask) or forward(a, b, source_mask)
    m.log = lambda *a, **k: None
    gen = torch.Generator().manual_seed(1)
    batch = {s: getattr(m.stitcher, s).dummy_batch(8, seconds=1.0, generator=gen) for s in ("a", "b")}
    m.training_step({**batch, "step": torch.full((8,), 3)}, 0)
    torch.testing.assert_close(seen[0], m.objective.source_mask(8, 3))
    assert 0 < seen[0].sum() < 8
