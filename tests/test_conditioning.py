"""Conditioning (soe/flow/conditioning.py): given latent frames in training and sampling, task mixtures."""
import pytest
import torch
from conftest import batch_for, tiny

from soe.flow.conditioning import GivenLatents, TaskError, TaskMixture, given_for_task, prefix_mask
from soe.flow.objective import FlowObjective
from soe.sample.sampler import sample, sample_stitched
from soe.schema import SamplerConfig
from soe.stitch.stitcher import Stitcher


def pair():
    return {"a": tiny("wan2.1"), "b": tiny("ace-step-1.5")}


def clean_batches(experts, bsz=4, seed=0):
    return {k: batch_for(e, bsz, seed=seed + n) for n, (k, e) in enumerate(experts.items())}


def objective(experts, tasks=None, **kw):
    mix = TaskMixture(tasks, experts, seed=3) if tasks is not None else None
    return FlowObjective(experts, seed=3, tasks=mix, **kw)


# ---- training ---------------------------------------------------------------------------------------
def test_default_joint_mixture_is_bit_for_bit_today():
    experts = pair()
    clean = clean_batches(experts)
    plain, joint = objective(experts, balance="ema"), objective(experts, {"joint": 1.0}, balance="ema")
    assert joint.tasks is None  # {joint: 1.0} draws nothing
    (ia, ta), (ib, tb) = plain.noised(clean, step=5), joint.noised(clean, step=5)
    preds = {k: torch.randn_like(ia[k]["latents"]) for k in ia}
    for k in ia:
        assert torch.equal(ia[k]["latents"], ib[k]["latents"]) and torch.equal(ia[k]["timestep"], ib[k]["timestep"])
    assert torch.equal(plain(preds, ta)[0], joint(preds, tb)[0])
    assert torch.equal(plain.loss_ema, joint.loss_ema)


def test_task_stream_is_a_function_of_seed_step_rank_only():
    experts = pair()
    mix = TaskMixture({"joint": 0.4, "v2a": 0.2, "a2v": 0.2, "image": 0.1, "extend": 0.1}, experts, seed=3)
    other = TaskMixture({"joint": 0.4, "v2a": 0.2, "a2v": 0.2, "image": 0.1, "extend": 0.1}, experts, seed=3)
    for s in range(5):  # history does not matter: a resumed run draws what an uninterrupted one drew
        mix.draw(8, step=s)
    assert mix.draw(64, step=7) == other.draw(64, step=7)
    assert mix.draw(64, step=7) != mix.draw(64, step=8) and mix.draw(64, step=7) != mix.draw(64, step=7, rank=1)
    drawn = sum((mix.draw(64, step=s) for s in range(40)), [])
    share = {t: drawn.count(t) / len(drawn) for t in mix.names}
    assert abs(share["joint"] - 0.4) < 0.05 and abs(share["v2a"] - 0.2) < 0.05  # follows the weights


def test_given_frames_stay_clean_carry_no_loss_and_fully_given_side_gets_timestep_zero(monkeypatch):
    experts = pair()
    obj = objective(experts, {"v2a": 1.0, "image": 1.0})
    drawn = ["v2a", "image", "v2a", "image"]
    monkeypatch.setattr(obj.tasks, "draw", lambda n, step, rank=0: drawn[:n])
    clean = clean_batches(experts)
    inputs, targets = obj.noised(clean, step=0)
    va, vb = clean["a"]["latents"], inputs["a"]["latents"]
    assert torch.equal(vb[0], va[0]) and torch.equal(vb[2], va[2])  # v2a: the whole video is clean
    assert torch.equal(vb[1, :, :1], va[1, :, :1]) and not torch.equal(vb[1, :, 1:], va[1, :, 1:])  # image: frame 0
    t = inputs["a"]["timestep"]
    assert t.shape == (4,) and t[0] == 0 and t[2] == 0 and t[1] > 0  # wan2.1 takes one timestep per clip
    assert torch.equal(inputs["b"]["latents"], targets["b"]["x_t"]) and not torch.equal(inputs["b"]["latents"], clean["b"]["latents"])
    # the loss ignores given positions: changing the prediction there changes nothing, and no gradient reaches it
    pred = torch.randn_like(va, requires_grad=True)
    loss = obj.modality_loss("a", pred, targets["a"])
    loss.backward()
    assert torch.all(pred.grad[0] == 0) and torch.all(pred.grad[1, :, :1] == 0) and pred.grad[1, :, 1:].abs().sum() > 0
    moved = pred.detach().clone()
    moved[0] += 5.0
    moved[1, :, 0] -= 3.0
    assert torch.equal(obj.modality_loss("a", moved, targets["a"]), loss.detach())


def test_per_frame_timestep_expert_gets_zero_on_given_frames_and_matches_its_image_path():
    v = tiny("wan2.2-ti2v")
    experts = {"a": v, "b": tiny("ace-step-1.5")}
    batch = batch_for(v, 2, seconds=1.0)
    clean = batch_for(v, 2, seconds=1.0, seed=5)["latents"]
    given = given_for_task("image", experts, {"a": clean})["a"]
    sigma = torch.tensor([0.7, 0.4])
    t = given.timestep(v, sigma)
    assert t.shape == (2, clean.shape[2]) and torch.all(t[:, 0] == 0) and torch.equal(t[:, 1:], sigma[:, None].expand(2, clean.shape[2] - 1))
    with torch.no_grad():
        generic = v({**batch, "latents": given.paste(batch["latents"]), "timestep": t})
        native = v({**batch, "timestep": sigma, "image_latents": clean[:, :, :1]})  # the plugin's own TI2V path
        flat = v({**batch, "timestep": sigma[:, None].expand(2, clean.shape[2])})
        scalar = v({**batch, "timestep": sigma})
    torch.testing.assert_close(generic, native)
    torch.testing.assert_close(flat, scalar)  # one sigma per frame, all equal == one per clip


def test_a_task_the_experts_cannot_serve_is_refused():
    two_audio = {"a": tiny("ace-step-1.5"), "b": tiny("ace-step-1.5")}
    with pytest.raises(TaskError, match=r"flow.tasks.v2a: needs a video expert"):
        TaskMixture({"joint": 0.5, "v2a": 0.5}, two_audio)
    with pytest.raises(TaskError, match="unknown task"):
        TaskMixture({"i2v": 1.0}, pair())
    with pytest.raises(TaskError, match="sum to 0"):
        TaskMixture({"joint": 0.0}, pair())


# ---- sampling ---------------------------------------------------------------------------------------
def stitched_pair():
    experts = pair()
    st = Stitcher(experts["a"], experts["b"], connector={"init": "trunc_normal"}).eval()  # non-zero connectors
    return experts, st


def conditions(experts, bsz=2):
    return {k: e.conditioning(bsz, 1.0, generator=torch.Generator().manual_seed(1)) for k, e in experts.items()}


@pytest.mark.parametrize("task", ["v2a", "a2v", "image", "extend"])
def test_sampled_latents_equal_the_given_clean_latents_exactly(task):
    experts, st = stitched_pair()
    truth = {k: batch_for(e, 2, seed=9)["latents"].float() for k, e in experts.items()}
    given = given_for_task(task, experts, truth, extend_seconds=0.5)
    settings = SamplerConfig(steps=3, scheduler="unipc", guidance={"a": 2.0, "b": 3.0})
    out = sample_stitched(st, conditions(experts), 1.0, settings, given=given)
    for k, g in given.items():
        m = g.mask
        x = out[k].movedim(g.time_axis, 1)  # (B, T, ...)
        assert torch.equal(x[m], truth[k].movedim(g.time_axis, 1)[m])  # bit for bit
        if not g.full:
            assert not torch.equal(x[~m], truth[k].movedim(g.time_axis, 1)[~m])  # the rest was sampled


def test_fully_given_modality_is_not_denoised_yet_feeds_the_connectors():
    experts, st = stitched_pair()
    settings = SamplerConfig(steps=3, scheduler="euler")
    video = [batch_for(experts["a"], 2, seed=s)["latents"].float() for s in (1, 2)]
    seen = []

    def spy(inputs, mask):
        seen.append(inputs["a"]["timestep"].clone())
        pa, pb = st(inputs["a"], inputs["b"], source_mask=mask)
        return {"a": pa, "b": pb}

    out = [sample(experts, conditions(experts), 1.0, settings, spy, given=given_for_task("v2a", experts, {"a": v})) for v in video]
    assert all(torch.all(t == 0) for t in seen)  # the given video runs at timestep 0
    assert torch.equal(out[0]["a"], video[0])
    assert not torch.allclose(out[0]["b"], out[1]["b"])  # another video -> other audio: it reached the connectors
    unstitched = [sample(experts, conditions(experts), 1.0, settings, given=given_for_task("v2a", experts, {"a": v}))["b"] for v in video]
    assert torch.equal(unstitched[0], unstitched[1])  # ... and only through them


def test_no_given_is_todays_sampler_bit_for_bit():
    experts, st = stitched_pair()
    settings = SamplerConfig(steps=3, guidance={"a": 1.5, "b": 1.0})
    assert all(torch.equal(x, y) for x, y in zip(sample_stitched(st, conditions(experts), 1.0, settings).values(),
                                                   sample_stitched(st, conditions(experts), 1.0, settings, given={}).values()))


@pytest.mark.parametrize("policy", ["keep", "zeros"])
def test_unconditional_half_sees_the_reference_or_zeros(policy):
    """UniVerse-1: frame 0 is the image latent in the conditional half and zeros in the unconditional one."""
    experts, st = stitched_pair()
    ref = torch.randn(experts["a"].latent_shape(2, 1.0)) + 3.0
    given = given_for_task("image", experts, {"a": ref}, uncond=policy)
    seen = []

    def spy(inputs, mask):
        seen.append((inputs["a"]["latents"].clone(), inputs["a"]["timestep"].clone()))
        pa, pb = st(inputs["a"], inputs["b"], source_mask=mask)
        return {"a": pa, "b": pb}

    out = sample(experts, conditions(experts), 1.0, SamplerConfig(steps=2, guidance={"a": 2.0, "b": 1.0}), spy, given=given)
    for x, t in seen:
        cond, uncond = x[:2, :, 0], x[2:, :, 0]
        assert torch.equal(cond, ref[:, :, 0])
        assert torch.equal(uncond, ref[:, :, 0] if policy == "keep" else torch.zeros_like(uncond))
        assert t.shape == (4,) and torch.all(t == t[0]) and t[0] > 0  # wan2.1 keeps the step's one timestep (UniVerse-1)
    assert torch.equal(out["a"][:, :, 0], ref[:, :, 0])  # pasted back into the final latents


def test_universe1_recipe_uses_the_zero_reference():
    from pathlib import Path

    from soe.recipe.reading import load_recipe

    cfg = load_recipe(Path(__file__).parents[1] / "recipes" / "universe1.yaml")
    assert cfg.sample.given_uncond == "zeros" and dict(cfg.flow.tasks) == {"image": 1.0}  # frame 0 = the reference, always


def test_given_latents_checks_its_mask():
    with pytest.raises(ValueError, match="mask"):
        GivenLatents(torch.zeros(2, 4, 6, 8, 8), prefix_mask(torch.tensor([1, 1]), 5), time_axis=2)


@pytest.mark.slow
def test_training_with_a_task_mixture_resumes_exactly(tmp_path):
    from rich.console import Console
    from test_generate_given import tiny_recipe

    from soe.cli.stitch import run_training

    recipe = tiny_recipe(tmp_path)

    def train(run_dir, *overrides):
        return run_training(recipe, [f"run_dir={run_dir}", *overrides], console=Console(file=open("/dev/null", "w")), progress=False)

    mix = ["flow.tasks={joint: 0.4, v2a: 0.2, a2v: 0.2, image: 0.1, extend: 0.1}", "trainer.checkpoint_every_n_steps=2",
           "sample.at_end=false"]
    straight = train(tmp_path / "straight", "trainer.max_steps=4", *mix)["module"]
    train(tmp_path / "split", "trainer.max_steps=2", *mix)
    resumed = train(tmp_path / "split", "trainer.max_steps=4", "resume=true", *mix)["module"]
    assert straight.objective.tasks is not None
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_given_frames_per_task():
    from soe.flow.conditioning import given_frames

    assert given_frames("extend", "video", 12, 6.25, 0.5) == 3  # frames wholly inside the given 0.5 s
    assert given_frames("extend", "audio", 50, 25.0, 0.5) == 12
    assert given_frames("extend", "audio", 50, 25.0, 0.001) == 1 and given_frames("extend", "audio", 50, 25.0, 9.0) == 49
    assert given_frames("extend", "video", 12, 6.25, None) == 6  # default: half the clip
    assert given_frames("image", "video", 12, 6.25, None) == 1 and given_frames("image", "audio", 50, 25.0, None) == 0
    assert given_frames("v2a", "video", 12, 6.25, None) == 12 and given_frames("v2a", "audio", 50, 25.0, None) == 0
    assert given_frames("a2v", "audio", 50, 25.0, None) == 50 and given_frames("joint", "video", 12, 6.25, None) == 0
