import pytest
import torch
from conftest import batch_for, tiny

from soe.flow.objective import FlowObjective, shift_sigma
from soe.rng import generator_for


def objective(**kw):
    return FlowObjective({"a": tiny("wan2.1"), "b": tiny("ace-step-1.5")}, **kw)


def test_noise_streams_are_independent_per_modality_yet_reproducible():
    obj = objective(seed=7)
    like = torch.zeros(4, 1000)
    na, nb = obj.noise("a", like, step=3), obj.noise("b", like, step=3)
    assert not torch.equal(na, nb)
    corr = torch.corrcoef(torch.stack([na.flatten(), nb.flatten()]))[0, 1]
    assert abs(corr) < 0.05  # 4000 samples: |r| of independent streams is ~0.016
    assert torch.equal(na, objective(seed=7).noise("a", like, step=3))  # same run, same noise
    assert not torch.equal(na, obj.noise("a", like, step=4))  # next step, new noise
    assert not torch.equal(na, obj.noise("a", like, step=3, rank=1))  # other rank, new noise


def test_shared_timesteps_are_one_base_time_shifted_per_expert():
    obj = objective(timesteps="shared", shifts={"a": 1.0, "b": 3.0}, density="uniform")
    s = obj.sigmas(16, step=0)
    torch.testing.assert_close(s["b"], shift_sigma(s["a"], 3.0))
    ind = objective(timesteps="independent", shifts={"a": 1.0, "b": 1.0}).sigmas(16, step=0)
    assert not torch.allclose(ind["a"], ind["b"])


def test_shift_maps_unit_interval_onto_itself_and_raises_noise():
    s = torch.linspace(0, 1, 11)
    out = shift_sigma(s, 3.0)
    assert out[0] == 0 and out[-1] == 1 and torch.all(out[1:-1] > s[1:-1])


def test_noising_and_velocity_target():
    obj = objective(seed=1)
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    clean = {"a": batch_for(a), "b": batch_for(b)}
    inputs, targets = obj.noised(clean, step=0)
    for k in ("a", "b"):
        s = targets[k]["sigma"]
        torch.testing.assert_close(inputs[k]["latents"], (1 - s) * clean[k]["latents"] + s * targets[k]["eps"])
        assert inputs[k]["timestep"].shape == (2,) and torch.all((inputs[k]["timestep"] > 0) & (inputs[k]["timestep"] < 1))
        # the exact velocity gives zero loss
        v = targets[k]["eps"] - targets[k]["x0"]
        assert obj.modality_loss(k, v, targets[k]) < 1e-10


def test_x0_space_loss_is_sigma_squared_weighted_velocity_loss():
    obj = objective()
    obj.loss_space["b"] = "x0"
    x0, eps = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigma = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1)
    target = {"x0": x0, "eps": eps, "x_t": (1 - sigma) * x0 + sigma * eps, "sigma": sigma}
    pred = torch.randn(3, 5, 4)
    expected = torch.mean(sigma**2 * (pred - (eps - x0)) ** 2)
    torch.testing.assert_close(obj.modality_loss("b", pred, target), expected)


def test_ema_balancing_equalises_modalities():
    obj = objective(balance="ema", momentum=0.5).train()
    targets = {k: {"x0": torch.zeros(2, 3), "eps": torch.zeros(2, 3)} for k in ("a", "b")}
    preds = {"a": torch.full((2, 3), 1.0, requires_grad=True), "b": torch.full((2, 3), 10.0, requires_grad=True)}  # losses 1, 100
    total, losses = obj(preds, targets)
    assert (losses["b"] / losses["a"]).item() == pytest.approx(100)
    assert total.item() == pytest.approx(2.0)  # each term normalised to ~1
    total.backward()
    assert obj.ema_steps == 1


def test_generator_for_differs_by_every_label():
    draws = {lbl: torch.rand(3, generator=generator_for(0, *lbl)).tolist() for lbl in [("x", 0), ("x", 1), ("y", 0)]}
    assert len({tuple(v) for v in draws.values()}) == 3
