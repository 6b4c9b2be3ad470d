"""The two engines: named hooks (what each puts on the experts, listed by `soe inspect`), and the
lockstep engine's options (inserted blocks, taps, add / attention_kv) in combination."""
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny

from soe import Stitcher
from soe.cli import main

TINY = Path(__file__).parent / "recipes" / "tiny.yaml"
DEPTH = {"mode": "insert_interpolated", "every": 1}  # ace-step 2 blocks -> 4 (inserted at 1 and 3)
KV_INTO_WAN = dict(mode="attention_kv", tap="after_self_attn", targets=[dict(attention="attn2", pre_norm="norm2", copy_from="attn2")])


def torch_hooks(module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_hook_engine_names_each_hook_after_direction_side_and_block():
    a, b = tiny("wan2.1"), tiny("ace-step-1.5", 1)
    st = Stitcher(a, b, direction="b_to_a", engine="hooks", connector={"init": "trunc_normal"})
    expected = {f"soe.b_to_a.b.{j:02d}.capture" for _, j in st.pairs} | {f"soe.b_to_a.a.{i:02d}.add" for i, _ in st.pairs}
    assert set(st.hooks.names()) == expected and len(st.hooks) == 2 * len(st.pairs)
    for h in st.hooks:  # each name is a real torch hook on that block
        assert (h.direction, h.kind, h.target) == ("b_to_a", "forward_hook", "")
        assert len(getattr(st, h.side).blocks[h.block]._forward_hooks) == 1
    ba, bb = batch_for(a), batch_for(b)
    with torch.no_grad():
        stitched = st(ba, bb)
        st.unstitch()
        assert st.hooks.names() == [] and all(torch_hooks(blk) == 0 for blk in (*a.blocks, *b.blocks))
        st.restitch()  # the same connectors again
        assert set(st.hooks.names()) == expected
        assert all(torch.equal(x, y) for x, y in zip(st(ba, bb), stitched))


def test_plain_lockstep_puts_nothing_on_the_experts():
    a, b = tiny("wan2.1"), tiny("ace-step-1.5", 1)
    st = Stitcher(a, b, direction="both")
    assert st.engine == "lockstep" and len(st.hooks) == 0 and st.fusion is None
    assert all(torch_hooks(m) == 0 for m in (*a.modules(), *b.modules()))


def test_lockstep_names_taps_processors_joins_and_block_entries():
    a, b = tiny("wan2.1"), tiny("ace-step", 1)
    st = Stitcher(a, b, pairs="identity", depth=DEPTH, inject={"b_to_a": KV_INTO_WAN, "a_to_b": {"tap": "cross_attn_input"}})
    blocks = range(4)
    expected = ({f"soe.b_to_a.b.{k:02d}.{w}" for k in blocks for w in ("tap", "enter")}
                | {f"soe.b_to_a.a.{k:02d}.{w}" for k in blocks for w in ("kv.attn2", "join.norm2", "enter")}
                | {f"soe.a_to_b.a.{k:02d}.{w}" for k in blocks for w in ("tap", "enter")})  # add mode: nothing on b
    assert set(st.hooks.names()) == expected
    kv = [h for h in st.hooks if h.kind == "processor"]
    assert all(type(st.a.blocks[h.block].attn2.processor).__name__ == "KVProcessor" for h in kv)
    inserted = st.run_order("b")[1]  # hooks on inserted blocks sit on the Stitcher's copies, by run-order index
    assert inserted is st.fusion.inserted["b"]["01"] and torch_hooks(inserted) == 1 and torch_hooks(inserted.cross_attn) == 1
    st.unstitch()
    assert len(st.hooks) == 0 and all(torch_hooks(m) == 0 for m in (*st.a.modules(), *st.b.modules(), *st.fusion.modules()))
    assert all(type(m.processor).__name__ != "KVProcessor" for m in st.a.modules() if hasattr(m, "processor"))


def test_soe_inspect_lists_the_hooks(capsys):
    assert main(["inspect", str(TINY), "stitch.direction=a_to_b"]) == 0
    out = capsys.readouterr().out
    assert "hooks on the experts" in out and "soe.a_to_b.a.*.capture" in out and "soe.a_to_b.b.*.add" in out
    assert main(["inspect", str(TINY), "stitch.direction=both"]) == 0
    assert "(none)" in capsys.readouterr().out  # plain lockstep: nothing sits on the experts


def test_a_tap_feeds_the_connector_from_inside_the_source_block():
    """Lockstep with ``tap: after_self_attn`` equals an independent reference: the native forwards,
    the connector fed from the input of the source block's ``norm2``, added to the host block output."""
    a, b = tiny("wan2.1"), tiny("ace-step-1.5", 1)
    torch.manual_seed(2)
    st = Stitcher(a, b, direction="a_to_b", inject={"a_to_b": {"tap": "after_self_attn"}}, connector={"init": "trunc_normal"})
    assert st.engine == "lockstep"
    ba, bb = batch_for(a, seed=3), batch_for(b, seed=4)
    with torch.no_grad():
        pa, pb = st(ba, bb)
        st.unstitch()
        la, lb = a.token_layout(ba), b.token_layout(bb)
        seen, handles = {}, []
        for i, j in st.pairs:
            handles.append(a.blocks[i].norm2.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0])))
            conn = st.connector_for("a_to_b", j)
            handles.append(b.blocks[j].register_forward_hook(
                lambda m, args, out, i=i, conn=conn: b.with_block_output_hidden(out, b.block_output_hidden(out) + conn(seen[i], la, lb))))
        ref_a, ref_b = a(ba), b(bb)
        for h in handles:
            h.remove()
        assert not torch.allclose(ref_b, b(bb))  # the tap really feeds the host
    torch.testing.assert_close(pa, ref_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pb, ref_b, rtol=1e-5, atol=1e-6)


def mixed(seed=0, init="zero", dtype=torch.float32):
    """Both directions, different options: b is expanded; b -> a injects key/values from a tap into
    wan's attn2; a -> b adds from a tap inside wan's blocks."""
    a, b = tiny("wan2.1", seed).to(dtype), tiny("ace-step", seed + 1).to(dtype)
    torch.manual_seed(seed + 2)
    st = Stitcher(a, b, pairs="identity", depth=DEPTH, inject={"b_to_a": KV_INTO_WAN, "a_to_b": {"tap": "cross_attn_input"}},
                  connector={"init": init})
    return st, batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4)


def test_mixed_options_each_act_on_their_own_host_only():
    st, ba, bb = mixed()
    with torch.no_grad():
        pa, pb = st(ba, bb)
        s = st.b.embed(bb)
        for blk in range(4):
            s = st.fusion.stacks["b"].run(st.b, blk, s)
        assert torch.equal(pb, st.b.head(s, bb))  # a -> b adds through zero-initialised connectors: the expanded b exactly
        assert not torch.allclose(pa, st.a(ba))  # b -> a's extra key/values change wan's cross-attention


def test_mixed_options_train_and_recompute_under_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        st, ba, bb = mixed(init="trunc_normal")
        st.train()
        for e in (st.a, st.b):
            e.requires_grad_(False)
            e.set_gradient_checkpointing(checkpointing)
        pa, pb = st(ba, bb)
        (pa.square().mean() + pb.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in st.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert {n.split(".")[1] for n in grads[0] if n.startswith("connectors.")} == {"a_to_b", "b_to_a"}
    assert any(n.startswith("fusion.kv.b_to_a") for n in grads[0]) and any(n.startswith("fusion.inserted.b") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_missing_module_leaves_the_experts_as_they_were():
    a, b = tiny("wan2.1"), tiny("ace-step", 1)
    bad = {"a_to_b": dict(KV_INTO_WAN, tap="cross_attn_input", targets=[dict(attention="cross_attn")]),  # installs first ...
           "b_to_a": dict(KV_INTO_WAN, tap="no_such_point")}  # ... then this one fails
    with pytest.raises(ValueError, match="declares no tap point 'no_such_point'"):
        Stitcher(a, b, pairs="identity", depth=DEPTH, inject=bad)
    assert all(torch_hooks(m) == 0 for m in (*a.modules(), *b.modules()))
    assert all(type(m.processor).__name__ != "KVProcessor" for m in a.modules() if hasattr(m, "processor"))


def test_float32_connectors_and_projections_read_bfloat16_experts_without_autocast():
    """Sampling runs bf16 experts with the stitch's own modules in float32 and no autocast (on a GPU
    this was a dtype error in the connector MLP and the new key/value projections): the mixed model
    computes the float32 model's function, off by no more than bf16 puts the experts alone off."""
    ref_st, ba, bb = mixed(init="trunc_normal")
    st, _, _ = mixed(init="trunc_normal", dtype=torch.bfloat16)
    assert {p.dtype for p in st.connectors.parameters()} | {p.dtype for p in st.fusion.kv.parameters()} == {torch.float32}
    cast = lambda batch: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}  # noqa: E731
    rel = lambda got, ref: ((got.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    with torch.no_grad():
        stitched = [rel(g, r) for g, r in zip(st(cast(ba), cast(bb)), ref_st(ba, bb))]
        alone = [rel(tiny(name, seed).to(torch.bfloat16)(cast(batch)), tiny(name, seed)(batch))
                 for name, seed, batch in (("wan2.1", 0, ba), ("ace-step", 1, bb))]
    for side, err, own in zip("ab", stitched, alone):
        assert err < 1.5 * own + 0.01, f"{side}: stitched bf16 error {err:.3f} vs the expert's own {own:.3f}"
