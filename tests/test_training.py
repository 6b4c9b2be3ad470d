"""Training end to end on the demo recipe (shortened by overrides)."""
from pathlib import Path

import pytest
import torch
from rich.console import Console

from soe.cli.stitch import run_training
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.train.plots import read_run_metrics
from soe.train.trained import load_trained

DEMO = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"  # tiny random experts: fast; recipes/demo.yaml is tested in test_first_run.py
QUIET = Console(file=open("/dev/null", "w"))
SHORT = ["data.num_clips=32", "data.batch_size=4", "data.seconds=1.0", "trainer.log_every_n_steps=1"]


def train(tmp, *overrides):
    return run_training(DEMO, [*SHORT, f"run_dir={tmp}", *overrides], console=QUIET, progress=False)


def test_demo_trains_loss_falls_and_checkpoint_holds_exactly_the_trainable_tensors(tmp_path):
    result = train(tmp_path / "run", "trainer.max_steps=40", "optim.lr=3e-3", "trainer.checkpoint_every_n_steps=20")
    run_dir, module = result["run_dir"], result["module"]
    series = read_run_metrics(run_dir)
    for key in ("loss_a_video", "loss_b_audio"):
        values = [v for _, v in series[key]]
        assert sum(values[-5:]) / 5 < sum(values[:5]) / 5, key
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(ckpt["state_dict"]) == trainable | {"objective.loss_ema", "objective.ema_steps"}
    assert any(".lora_A." in n for n in trainable) and any(n.startswith("stitcher.connectors.") for n in trainable)
    assert not any(".lora_" not in n and "connectors" not in n for n in trainable)  # frozen experts never saved
    assert (run_dir / "checkpoints" / "step-000020.ckpt").is_file()
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "loss_curves.png").is_file()
    assert (run_dir / "tensorboard").is_dir()


def test_only_trainable_parameters_change(tmp_path):
    cfg = load_recipe(DEMO, [*SHORT, f"run_dir={tmp_path}"])
    torch.manual_seed(0)
    st = build_stitcher(cfg)
    before = {n: p.detach().clone() for n, p in st.named_parameters()}
    result = run_training(cfg, console=QUIET, progress=False) if False else None
    result = train(tmp_path / "r", "trainer.max_steps=3")
    st = result["module"].stitcher
    after = dict(st.named_parameters())
    ref = build_stitcher(load_recipe(DEMO, [*SHORT, f"run_dir={tmp_path}"]))  # same seed -> same initial experts
    torch.manual_seed(0)
    ref_params = dict(ref.named_parameters())
    for n, p in after.items():
        base = n.replace(".base_layer", "")
        if p.requires_grad:
            continue
        assert base in ref_params, n
        assert torch.equal(p, ref_params[base]) or torch.equal(p, before.get(base, p)), f"frozen {n} changed"
    changed = [n for n, p in after.items() if p.requires_grad and "lora_B" in n and p.abs().sum() > 0]
    assert changed  # LoRA B starts at zero and moved


def test_resume_gives_identical_weights(tmp_path):
    straight = train(tmp_path / "straight", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2")["module"]
    train(tmp_path / "split", "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=2")
    resumed = train(tmp_path / "split", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "resume=true")
    assert resumed["trainer"].global_step == 4
    steps = [s for s, _ in read_run_metrics(tmp_path / "split")["loss"]]
    assert steps == [0, 1, 2, 3]  # the resumed run's log keeps the first run's steps
    a, b = straight.trainable_state_dict(), resumed["module"].trainable_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tmp_path):
    from soe.errors import RecipeError

    train(tmp_path / "r", "trainer.max_steps=1", "trainer.checkpoint_every_n_steps=1")
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        train(tmp_path / "r", "trainer.max_steps=1")
    with pytest.raises(RecipeError, match="no checkpoint to resume"):
        train(tmp_path / "other", "resume=true")


def test_exported_adapters_load_back_with_peft(tmp_path):
    result = train(tmp_path / "r", "trainer.max_steps=3", "stitch.connector.init=trunc_normal")
    trained = result["module"].stitcher.eval()
    cfg = load_recipe(DEMO, [*SHORT, f"run_dir={tmp_path}/r"])
    torch.manual_seed(123)  # different random init: everything that matters must come from the export
    fresh = build_stitcher(cfg)
    fresh.a.model.load_state_dict({k.replace(".base_layer", ""): v for k, v in trained.a.model.state_dict().items() if "lora_" not in k})
    fresh.b.model.load_state_dict({k.replace(".base_layer", ""): v for k, v in trained.b.model.state_dict().items() if "lora_" not in k})
    load_trained(fresh, tmp_path / "r" / "trained")
    fresh.eval()
    ba, bb = fresh.a.dummy_batch(2, 1.0, torch.Generator().manual_seed(0)), fresh.b.dummy_batch(2, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for x, y in zip(fresh(ba, bb), trained(ba, bb)):
            torch.testing.assert_close(x, y)


def test_gradient_accumulation_and_cosine_schedule_run(tmp_path):
    result = train(tmp_path / "r", "trainer.max_steps=2", "trainer.accumulate_grad_batches=2", "optim.schedule=cosine",
                   "experts.b.gradient_checkpointing=true", "flow.timesteps=independent")
    assert result["trainer"].global_step == 2


def test_wan_with_ace_step_v1_trains(tmp_path):
    """UniVerse-1's pair at tiny size: WAN2.1 + ACE-Step v1 (x0-space loss) train end to end."""
    result = train(tmp_path / "r", "trainer.max_steps=3", "experts.b.name=ace-step", "experts.b.options={sample_rate: 25600}")
    st = result["module"].stitcher
    assert st.b.name == "ace-step" and st.b.token_rate == 6.25
    assert result["module"].objective.loss_space == {"a": "velocity", "b": "x0"}
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in st.b.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_cpu_processes(tiny_stitch, strategy):
    """DDP and FSDP2 (ModelParallelStrategy) with 2 CPU processes through gloo, in a subprocess (tiny_stitch,
    tests/conftest.py: tests/test_context_parallel.py compares the same runs with its context-parallel ones)."""
    run = tiny_stitch("trainer.devices=2", f"trainer.strategy={strategy}")
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "trained" / "connectors.safetensors").exists()
