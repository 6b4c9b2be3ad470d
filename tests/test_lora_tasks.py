"""``experts.<side>.lora.{tasks, preserve, lr_scale}``: what an expert's LoRA learns from (soe/lora/task_gate.py)."""
from pathlib import Path

import pytest
import torch

from soe.errors import RecipeError
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.schema import OptimConfig
from soe.train.build import apply_training_setup, build_lora_training, build_objective
from soe.train.module import StitchModule

TINY = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"
MIX = "flow.tasks={joint: 0.5, v2a: 0.5}"


def module_for(*overrides) -> StitchModule:
    cfg = load_recipe(TINY, ["data.seconds=1.0", "data.batch_size=4", MIX, *overrides])
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    for name, p in st.named_parameters():  # LoRA B and connectors start at zero: make every path live
        if p.requires_grad and p.abs().sum() == 0:
            with torch.no_grad():
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return StitchModule(st, build_objective(cfg, st), OptimConfig(lr=1e-3), lora_training=build_lora_training(cfg, st))


def clean_batch(module: StitchModule) -> dict:
    return {s: getattr(module.stitcher, s).dummy_batch(4, seconds=1.0, generator=torch.Generator().manual_seed(1)) for s in ("a", "b")}


def step_inputs(module: StitchModule, step: int = 0):
    return module.objective.noised(clean_batch(module), step=step)


def lora_grads(module: StitchModule, side: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p for n, p in getattr(module.stitcher, side).model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def test_lora_tasks_stops_the_gradient_of_other_tasks_samples_only():
    m = module_for("experts.b.lora.tasks=[v2a]")
    inputs, targets = step_inputs(m)
    drawn = targets["a"]["tasks"]
    assert set(drawn) == {"joint", "v2a"}  # both tasks in this batch (fixed seed)
    gate = m.lora_training.gates["b"]
    assert len(gate) > 0 and set(m.lora_training.gates) == {"b"}
    plain = m.stitcher(inputs["a"], inputs["b"])[1]
    m.lora_training.mark(drawn)
    pred_b = m.stitcher(inputs["a"], inputs["b"])[1]
    torch.testing.assert_close(pred_b, plain, rtol=0, atol=0)  # the forward is unchanged
    per_sample = ((pred_b - 1.0) ** 2).flatten(1).mean(1)
    joint = torch.tensor([t == "joint" for t in drawn])
    from_joint = lora_grads(m, "b", per_sample[joint].sum())
    from_v2a = lora_grads(m, "b", per_sample[~joint].sum())
    assert all(g.abs().sum() == 0 for g in from_joint.values())  # joint samples: no gradient reaches the audio LoRA
    assert sum(g.abs().sum() for g in from_v2a.values()) > 0
    video_lora = lora_grads(m, "a", per_sample[joint].sum() + ((m.stitcher(inputs["a"], inputs["b"])[0]) ** 2).mean())
    assert sum(g.abs().sum() for g in video_lora.values()) > 0  # the other expert's LoRA is not gated


def test_lora_off_gives_the_stitch_without_that_adapter():
    m = module_for("experts.b.lora.preserve=1.0")
    inputs, _ = step_inputs(m)
    with torch.no_grad():
        with m.lora_training.off(["b"]):
            off = m.stitcher(inputs["a"], inputs["b"])
        on = m.stitcher(inputs["a"], inputs["b"])
        for name, p in m.stitcher.b.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
        zeroed = m.stitcher(inputs["a"], inputs["b"])
    assert not torch.allclose(on[1], zeroed[1])  # the audio LoRA changes the audio prediction
    torch.testing.assert_close(off[1], zeroed[1])
    torch.testing.assert_close(off[0], zeroed[0])


def test_preserve_adds_the_distance_to_the_lora_off_prediction_to_the_loss():
    batch_of = lambda m: {**clean_batch(m), "step": torch.zeros(4, dtype=torch.long)}  # noqa: E731
    plain, kept = module_for(), module_for("experts.b.lora.preserve=2.0")
    assert kept.lora_training.preserve == {"b": 2.0} and not plain.lora_training.preserve
    plain.log = kept.log = lambda *a, **k: None
    base, total = plain.training_step(batch_of(plain), 0), kept.training_step(batch_of(kept), 0)
    inputs, targets = step_inputs(kept)
    with torch.no_grad():
        pred = kept.stitcher(inputs["a"], inputs["b"])[1]
        with kept.lora_training.off(["b"]):
            ref = kept.stitcher(inputs["a"], inputs["b"])[1]
    from soe.lora.task_gate import preservation_error

    err = preservation_error(pred, ref, targets["b"], kept.objective.loss_space["b"])
    assert err > 0
    torch.testing.assert_close(total - base, 2.0 * kept.objective.loss_scale("b") * err, rtol=1e-4, atol=1e-7)


def test_lr_scale_puts_that_lora_in_its_own_group():
    m = module_for("experts.b.lora.lr_scale=0.1")
    groups = m.configure_optimizers()["optimizer"].param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    ids = {id(p) for p in groups[1]["params"]}
    audio_lora = {id(p) for n, p in m.stitcher.b.named_parameters() if "lora_" in n and p.requires_grad}
    assert ids == audio_lora
    assert sum(len(g["params"]) for g in groups) == len(m.trainable_parameters())


@pytest.mark.parametrize("override, message", [
    ("experts.b.lora.tasks=[t2v]", "experts.b.lora.tasks: unknown task 't2v'"),
    ("experts.b.lora.tasks=[a2v]", "experts.b.lora.tasks: none of ['a2v'] is drawn by flow.tasks"),
    ("experts.b.lora.preserve=-1", "preserve"),
])
def test_bad_lora_training_keys_are_one_line(override, message):
    with pytest.raises((RecipeError, ValueError)) as e:
        module_for(override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lora_off_tasks_run_those_samples_without_the_lora_and_the_others_with_it():
    m = module_for("experts.b.lora.off_tasks=[joint]")
    inputs, targets = step_inputs(m)
    drawn = targets["a"]["tasks"]
    joint = torch.tensor([t == "joint" for t in drawn])
    assert joint.any() and (~joint).any()
    with_lora = m.stitcher(inputs["a"], inputs["b"])[1]  # not marked yet: every sample with the LoRA
    with m.lora_training.off(["b"]):
        without = m.stitcher(inputs["a"], inputs["b"])[1]
    m.lora_training.mark(drawn)
    pred_b = m.stitcher(inputs["a"], inputs["b"])[1]
    torch.testing.assert_close(pred_b[joint], without[joint], rtol=0, atol=0)  # joint samples: as if it had no LoRA
    torch.testing.assert_close(pred_b[~joint], with_lora[~joint], rtol=0, atol=0)  # v2a samples: through the LoRA
    assert (with_lora[joint] - without[joint]).abs().max() > 0  # the LoRA is live, so the check above means something
    per_sample = ((pred_b - 1.0) ** 2).flatten(1).mean(1)
    assert all(g.abs().sum() == 0 for g in lora_grads(m, "b", per_sample[joint].sum()).values())
    assert sum(g.abs().sum() for g in lora_grads(m, "b", per_sample[~joint].sum()).values()) > 0


def test_lora_off_tasks_unknown_task_is_one_line():
    with pytest.raises(RecipeError, match=r"experts.b.lora.off_tasks: unknown task 'jiont'"):
        module_for("experts.b.lora.off_tasks=[jiont]")
