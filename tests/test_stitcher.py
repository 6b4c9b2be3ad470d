"""Stitching semantics: init invariance, engine equivalence, gradient routing, unstitching."""
import pytest
import torch
from conftest import batch_for, tiny

from soe import ConnectorConfig, Stitcher

PAIRS_OF_FAMILIES = [("wan2.1", "ace-step-1.5"), ("ace-step-1.5", "wan2.1"), ("wan2.1", "wan2.1"), ("ace-step-1.5", "ace-step-1.5"),
                     ("wan2.1", "ace-step"), ("ace-step", "wan2.1"), ("ace-step", "ace-step-1.5")]


def make(a_name="wan2.1", b_name="ace-step-1.5", direction="both", init="zero", seed=0, **kw):
    a, b = tiny(a_name, seed), tiny(b_name, seed + 1)
    torch.manual_seed(seed + 2)
    st = Stitcher(a, b, direction=direction, connector=ConnectorConfig(init=init), **kw)
    return st, batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4)


@pytest.mark.parametrize("a_name, b_name", PAIRS_OF_FAMILIES)
@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a", "both"])
def test_fresh_stitch_reproduces_each_expert_exactly(a_name, b_name, direction):
    st, ba, bb = make(a_name, b_name, direction)
    with torch.no_grad():
        pa, pb = st(ba, bb)
        assert torch.equal(pa, st.a(ba)) and torch.equal(pb, st.b(bb))


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a"])
@pytest.mark.parametrize("detach", [True, False])
def test_hook_engine_equals_lockstep_engine_outputs_and_gradients(direction, detach):
    results = {}
    for engine in ("hooks", "lockstep"):
        st, ba, bb = make(direction=direction, init="trunc_normal", engine=engine, detach_source=detach)
        st.train()
        pa, pb = st(ba, bb)
        (pa.square().mean() + pb.square().mean()).backward()
        grads = {n: p.grad.clone() for n, p in st.named_parameters() if p.grad is not None}
        results[engine] = (pa.detach(), pb.detach(), grads)
    (pa_h, pb_h, g_h), (pa_l, pb_l, g_l) = results["hooks"], results["lockstep"]
    torch.testing.assert_close(pa_h, pa_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb_h, pb_l, rtol=1e-5, atol=1e-6)
    assert g_h.keys() == g_l.keys()
    for n in g_h:
        torch.testing.assert_close(g_h[n], g_l[n], rtol=1e-4, atol=1e-6, msg=n)


def test_random_connectors_really_change_the_host_only():
    st, ba, bb = make(direction="a_to_b", init="trunc_normal")
    with torch.no_grad():
        pa, pb = st(ba, bb)
        assert torch.equal(pa, st.a(ba))  # the source is untouched in a one-way stitch
        assert not torch.allclose(pb, st.b(bb))


@pytest.mark.parametrize("direction", ["a_to_b", "b_to_a", "both"])
def test_frozen_experts_gradients_reach_connectors_only(direction):
    st, ba, bb = make(direction=direction)
    st.a.requires_grad_(False)
    st.b.requires_grad_(False)
    pa, pb = st(ba, bb)
    (pa.square().mean() + pb.square().mean()).backward()
    with_grad = {n for n, p in st.named_parameters() if p.grad is not None}
    connectors = {n for n, _ in st.named_parameters() if n.startswith("connectors.")}
    assert with_grad == connectors
    # zero-init: the output layer gets a gradient, the hidden layer none yet (its downstream weight is 0)
    assert any(p.grad.abs().sum() > 0 for n, p in st.named_parameters() if n.endswith("fc2.weight"))


@pytest.mark.parametrize("detach", [True, False])
def test_detach_source_stops_gradient_from_host_into_source(detach):
    st, ba, bb = make(direction="a_to_b", init="trunc_normal", detach_source=detach)
    _, pb = st(ba, bb)
    pb.square().mean().backward()  # loss of the host only
    source_grads = [p.grad for p in st.a.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert (len(source_grads) == 0) == detach


def test_unstitch_restores_native_outputs_and_keys():
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    keys_a, keys_b = list(a.state_dict()), list(b.state_dict())
    ba, bb = batch_for(a), batch_for(b)
    with torch.no_grad():
        ref_a, ref_b = a(ba), b(bb)
        st = Stitcher(a, b, direction="a_to_b", connector=ConnectorConfig(init="trunc_normal"))
        assert list(a.state_dict()) == keys_a and list(b.state_dict()) == keys_b
        assert sum(len(blk._forward_hooks) for blk in b.blocks) == len(st.pairs)
        _, pb = st(ba, bb)
        assert not torch.allclose(pb, ref_b)
        assert torch.equal(b(bb), ref_b)  # hooks are idle outside a stitcher call
        st.unstitch()
        assert all(len(blk._forward_hooks) == 0 for blk in (*a.blocks, *b.blocks))
        assert torch.equal(a(ba), ref_a) and torch.equal(b(bb), ref_b)
        assert list(a.state_dict()) == keys_a and list(b.state_dict()) == keys_b
    with pytest.raises(RuntimeError, match="unstitch"):
        st(ba, bb)


def test_connectors_live_in_the_stitcher_under_readable_names():
    st, _, _ = make(direction="both")
    names = {n.rsplit(".mlp", 1)[0] for n, _ in st.named_parameters() if n.startswith("connectors.")}
    assert names == {f"connectors.a_to_b.{j:02d}" for _, j in st.pairs} | {f"connectors.b_to_a.{i:02d}" for i, _ in st.pairs}
    assert not any("connector" in n for n, _ in st.a.named_parameters())


def test_hooks_are_pure_under_non_reentrant_checkpointing():
    """With checkpointing, hooks fire again on recompute; gradients must not change."""
    def grads(ckpt):
        st, ba, bb = make(direction="a_to_b", init="trunc_normal", detach_source=False)
        st.a.set_gradient_checkpointing(ckpt)
        st.b.set_gradient_checkpointing(ckpt)
        st.train()
        pa, pb = st(ba, bb)
        (pa.square().mean() + pb.square().mean()).backward()
        return {n: p.grad.clone() for n, p in st.named_parameters() if p.grad is not None}

    ref, got = grads(False), grads(True)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("mlp", ["mlp", "glu", "swiglu"])
def test_connector_types_zero_init(mlp):
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    st = Stitcher(a, b, connector={"mlp": mlp})
    ba, bb = batch_for(a), batch_for(b)
    with torch.no_grad():
        pa, pb = st(ba, bb)
        assert torch.equal(pa, a(ba)) and torch.equal(pb, b(bb))
    c = st.connector_for("a_to_b", st.pairs[0][1])
    assert c.mlp.fc2.out_features == b.hidden_size


def test_connector_hidden_defaults_to_sum_of_widths():
    st, _, _ = make()
    c = st.connector_for("a_to_b", st.pairs[0][1])
    assert c.mlp.fc1.out_features == st.a.hidden_size + st.b.hidden_size


@pytest.mark.parametrize("kwargs, message", [
    (dict(direction="sideways"), "direction"),
    (dict(engine="magic"), "engine"),
    (dict(engine="hooks", direction="both"), "one-way"),
    (dict(connector={"mlp": "kan"}), "connector.mlp"),
    (dict(connector={"init": "ones"}), "connector.init"),
])
def test_bad_stitcher_arguments(kwargs, message):
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    with pytest.raises(ValueError, match=message):
        Stitcher(a, b, **kwargs)
