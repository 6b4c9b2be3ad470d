"""``sample.lora_off``: per side, the sampling tasks that run that expert without its LoRA (soe/lora/task_gate.py
``loras_off``, applied by ``sample_stitched`` for the task read off what is given)."""
from pathlib import Path

import pytest
import torch
from conftest import batch_for, live_trainable

from soe.cli import main
from soe.flow.conditioning import TASKS, given_for_task, task_of
from soe.recipe.builders import build_sampler, build_stitcher
from soe.recipe.reading import load_recipe
from soe.sample.sampler import sample_stitched
from soe.train.build import apply_training_setup

TINY = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"


def live_stitch(*overrides):
    """The tiny recipe's stitch with every LoRA and connector weight non-zero (zero-init would hide the switch)."""
    cfg = load_recipe(TINY, ["data.seconds=1.0", "sample.steps=3", "sample.guidance={a: 1.0, b: 2.0}", *overrides])
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    apply_training_setup(st, cfg)
    live_trainable(st, seed=3)
    return cfg, st.eval()


def conditions(st):
    return {s: getattr(st, s).conditioning(2, 1.0, generator=torch.Generator().manual_seed(1)) for s in ("a", "b")}


def truth(st):
    return {s: batch_for(getattr(st, s), 2, seed=9)["latents"].float() for s in ("a", "b")}


def peft_adapters(expert, enabled: bool):
    """peft's own switch on every LoRA layer of an expert (the reference for 'without its LoRA')."""
    for m in expert.model.modules():
        if hasattr(m, "enable_adapters") and hasattr(m, "lora_A"):
            m.enable_adapters(enabled)


def test_task_of_reads_back_the_task_given_for_task_built():
    _, st = live_stitch()
    experts, clean = {"a": st.a, "b": st.b}, truth(st)
    for task in TASKS:
        given = given_for_task(task, experts, clean, extend_seconds=0.5) if task != "joint" else None
        assert task_of(given, {"a": "video", "b": "audio"}) == task
    assert task_of({}, {"a": "video", "b": "audio"}) == "joint"


def test_joint_samples_without_the_listed_sides_lora_and_v2a_keeps_it():
    cfg, st = live_stitch("sample.lora_off={b: [joint, image]}")
    settings, cond = build_sampler(cfg), conditions(st)
    plain = build_sampler(load_recipe(TINY, ["data.seconds=1.0", "sample.steps=3", "sample.guidance={a: 1.0, b: 2.0}"]))
    assert settings.lora_off == {"b": ["joint", "image"]} and plain.lora_off == {}
    with_lora = sample_stitched(st, cond, 1.0, plain)
    peft_adapters(st.b, False)
    reference = sample_stitched(st, cond, 1.0, plain)  # the audio expert without its LoRA, through peft
    peft_adapters(st.b, True)
    got = sample_stitched(st, cond, 1.0, settings)
    for side in ("a", "b"):
        torch.testing.assert_close(got[side], reference[side], rtol=0, atol=0)
    assert (got["b"] - with_lora["b"]).abs().max() > 1e-3  # the switch is not a no-op here
    again = sample_stitched(st, cond, 1.0, plain)  # the hooks are gone afterwards: the LoRA is back
    assert all(torch.equal(again[s], with_lora[s]) for s in ("a", "b"))
    given = given_for_task("v2a", {"a": st.a, "b": st.b}, truth(st))  # v2a is not listed: sampled with the LoRA
    v2a = sample_stitched(st, cond, 1.0, settings, given=given)
    v2a_ref = sample_stitched(st, cond, 1.0, plain, given=given)
    assert all(torch.equal(v2a[s], v2a_ref[s]) for s in ("a", "b"))


@pytest.mark.parametrize("override, expected", [
    ("sample.lora_off={b: [jiont]}", "sample.lora_off.b: expected tasks among"),
    ("sample.lora_off={c: [joint]}", "sample.lora_off.c: expected keys 'a' and 'b'"),
])
def test_bad_lora_off_is_one_line(override, expected, capsys):
    assert main(["inspect", str(TINY), override]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_lora_off_on_an_expert_without_lora_is_accepted(capsys):
    """`soe stitch recipes/demo.yaml experts.b.train=frozen` (an ablation the docs run) keeps working: a frozen
    expert has no LoRA, so it already samples without one."""
    assert main(["inspect", str(TINY), "experts.b.train=frozen", "sample.lora_off={b: [joint]}"]) == 0


def test_merged_export_refuses_a_run_that_samples_without_a_lora(tmp_path, capsys):
    from test_export import recipe, trained_run

    from soe.recipe.reading import merge_recipe

    cfg = recipe(tmp_path)
    cfg.sample.lora_off = {"b": ["joint"]}
    cfg = merge_recipe(cfg)
    trained_run(cfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", cfg.run_dir, "--format", "merged"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format merged: the run's sample.lora_off.b" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert main(["export", cfg.run_dir, "--format", "diffusers", "--out", str(tmp_path / "lora")]) == 0  # the LoRA stays a file


def test_an_expert_without_lora_layers_samples_as_it_is():
    """The untrained stitch (``soe generate`` without ckpt, the experts alone) has no LoRA layers: nothing to switch."""
    cfg = load_recipe(TINY, ["data.seconds=1.0", "sample.steps=2", "sample.lora_off={b: [joint]}"])
    torch.manual_seed(0)
    st = build_stitcher(cfg).eval()
    cond = conditions(st)
    got = sample_stitched(st, cond, 1.0, build_sampler(cfg))
    plain = sample_stitched(st, cond, 1.0, build_sampler(load_recipe(TINY, ["data.seconds=1.0", "sample.steps=2"])))
    assert all(torch.equal(got[s], plain[s]) for s in ("a", "b"))
