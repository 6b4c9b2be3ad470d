"""Memory and speed switches (soe/sample/speed.py, soe/sample/step_cache.py, soe/train/storage.py) against the plain path.

Tolerances: offloading and the attention backend are exact (same kernels, weights only move);
fp8 storage is bounded (3 mantissa bits: ~6% per weight, a few % on outputs of tiny random models);
the step cache is exact when it never skips (threshold 0) and, when it skips, equals the cached
residual rule it promises.
"""
from pathlib import Path

import pytest
import torch
from conftest import batch_for, tiny
from test_universe1 import fused

from soe import Stitcher
from soe.lora.adapters import set_trainable
from soe.sample.sampler import sample_stitched
from soe.sample.speed import apply_speed
from soe.sample.step_cache import StepCache, stitched_blocks
from soe.schema import LoraConfig, SamplerConfig, SpeedConfig
from soe.train.storage import store_frozen_in


def lockstep(seed=0):
    a, b = tiny("wan2.1", seed), tiny("ace-step", seed + 1)
    torch.manual_seed(seed + 2)
    st = Stitcher(a, b, pairs="linear", direction="both", connector={"init": "trunc_normal"})
    return st, batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4)


def rel(x, y):
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


MAKERS = {"lockstep": lockstep, "fused": fused}


@pytest.mark.slow
@pytest.mark.parametrize("engine,memory", [("lockstep", "offload_blocks"), ("fused", "offload_blocks"), ("fused", "offload_model")])
def test_offloading_is_exact_and_stitching_hooks_still_fire(engine, memory):
    st, ba, bb = MAKERS[engine]()
    with torch.no_grad():
        ref = st(ba, bb)
        alone = (st.a(ba), st.b(bb))  # the experts without stitching
        apply_speed(st, SpeedConfig(memory=memory), "cpu")
        got = st(ba, bb)
        again = st(ba, bb)  # second call: after the first call recorded the block order
    for g, r, a in zip(got, ref, alone):
        assert torch.equal(g, r)
        assert not torch.allclose(g, a)  # connectors/injection still act under offloading
    assert all(torch.equal(x, r) for x, r in zip(again, ref))


def test_offload_blocks_registers_one_group_per_block_and_keeps_the_rest_resident():
    st, ba, bb = fused()
    apply_speed(st, SpeedConfig(memory="offload_blocks"), "cpu")
    blocks = stitched_blocks(st)
    assert len(blocks["b"]) > st.b.num_blocks  # inserted blocks are offloaded too
    for side in ("a", "b"):
        for blk in blocks[side]:
            assert blk._diffusers_hook.get_hook("group_offloading") is not None
    assert not hasattr(st.connectors, "_diffusers_hook")


def test_fp8_storage_is_bounded():
    st, ba, bb = fused()
    with torch.no_grad():
        ref = st(ba, bb)
        apply_speed(st, SpeedConfig(storage_dtype="float8_e4m3fn"), "cpu")
        got = st(ba, bb)
    assert st.a.model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn  # really stored in fp8
    assert st.a.model.patch_embedding.weight.dtype == torch.float32  # skipped: patch embedding, norms
    for g, r in zip(got, ref):
        assert 0 < rel(g, r) < 0.08


def test_attention_backend_reaches_wrapped_processors_and_is_exact():
    st, ba, bb = fused()
    with torch.no_grad():
        ref = st(ba, bb)
        setup = apply_speed(st, SpeedConfig(attention_backend="native"), "cpu")
        got = st(ba, bb)
    assert "model.blocks.0.attn1" in setup.attention  # Wan's processors (wrapped by the injection) use the dispatcher
    assert "model.transformer_blocks.0.cross_attn" in setup.attention  # so do ACE-Step's softmax cross-attentions
    assert not any(n.endswith(".attn") and n.startswith("model.transformer_blocks") for n in setup.attention)  # not its linear one
    assert all(torch.equal(g, r) for g, r in zip(got, ref))


@pytest.mark.slow
def test_regional_compile_matches():
    st, ba, bb = lockstep()
    with torch.no_grad():
        ref = st(ba, bb)
        apply_speed(st, SpeedConfig(), "cpu")
        from soe.sample.speed import compile_blocks

        compile_blocks([b for bl in stitched_blocks(st).values() for b in bl], backend="eager")
        got = st(ba, bb)
    assert all(rel(g, r) < 1e-5 for g, r in zip(got, ref))


def _conditions(st):
    return {"a": st.a.conditioning(1, 1.0, torch.Generator().manual_seed(0)),
            "b": st.b.conditioning(1, 1.0, torch.Generator().manual_seed(1))}


@pytest.mark.slow
@pytest.mark.parametrize("engine", list(MAKERS))
def test_step_cache_threshold_zero_is_exact_and_a_loose_one_skips(engine):
    st, _, _ = MAKERS[engine]()
    cond, s = _conditions(st), SamplerConfig(steps=5, guidance={"a": 1.2, "b": 5.0})
    ref = sample_stitched(st, cond, 1.0, s)
    setup = apply_speed(st, SpeedConfig(cache="first_block", cache_threshold=0.0), "cpu")
    got = sample_stitched(st, cond, 1.0, s)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert setup.cache.stats["skipped"] == 0 and setup.cache.stats["computed"] == 5
    setup.cache.state.threshold = 1e9
    loose = sample_stitched(st, cond, 1.0, s)  # sampling resets the cache: the first step computes
    assert setup.cache.stats == {**setup.cache.stats, "computed": 1, "skipped": 4}
    assert all(torch.isfinite(loose[k]).all() and not torch.equal(loose[k], ref[k]) for k in ref)


def test_a_skipped_call_is_head_output_plus_the_cached_body_residual_for_both_experts():
    st, ba, bb = lockstep()
    cache = StepCache(stitched_blocks(st), threshold=1e9)
    seen = {}
    for side in ("a", "b"):
        head = stitched_blocks(st)[side][0]
        head.register_forward_hook(lambda m, a, out, side=side: seen.__setitem__(side, out))
    with torch.no_grad():
        st(ba, bb)  # computed: residuals cached
        body = dict(cache.state.body_res)
        st(ba, bb)  # skipped
    assert cache.stats["skipped"] == 1
    for side, e in (("a", st.a), ("b", st.b)):
        tail = stitched_blocks(st)[side][-1]
        outs = []
        h = tail.register_forward_hook(lambda m, a, out: outs.append(out))
        with torch.no_grad():
            st(ba, bb)
        h.remove()
        assert torch.equal(outs[0], seen[side] + body[("", side)])


def test_step_cache_decision_is_joint():
    """An expert whose own first block is stable still recomputes when the other's changed."""
    st, ba, bb = lockstep()
    cache = StepCache(stitched_blocks(st), threshold=0.05)
    with torch.no_grad():
        st(ba, bb)
        st(ba, bb)  # identical inputs: both heads unchanged -> skip
        assert cache.stats["skipped"] == 1
        bb2 = {**bb, "latents": bb["latents"] + torch.randn_like(bb["latents"])}  # only the audio input moves
        st(ba, bb2)
    assert cache.stats["computed"] == 2  # video's head is identical, yet the call computed
    cache.remove()
    assert all(not b._diffusers_hook.hooks for bl in stitched_blocks(st).values() for b in bl)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_with_fp8_frozen_weights_has_bounded_gradients(checkpointing):
    def grads(fp8):
        a, b = tiny("wan2.1"), tiny("ace-step", 1)
        for e in (a, b):
            set_trainable(e, "lora", LoraConfig(r=4, alpha=4))
            for n, p in e.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
            e.set_gradient_checkpointing(checkpointing)
            e.train()
        torch.manual_seed(2)
        st = Stitcher(a, b, pairs="linear", direction="both", connector={"init": "trunc_normal"})
        if fp8:
            assert store_frozen_in(a.model, "float8_e4m3fn", torch.float32)
            assert store_frozen_in(b.model, "float8_e4m3fn", torch.float32)
            assert all(p.dtype == torch.float32 for p in st.parameters() if p.requires_grad)  # LoRA, connectors untouched
        pa, pb = st(batch_for(a, 2, 1.0, 3), batch_for(b, 2, 1.0, 4))
        (pa.square().mean() + pb.square().mean()).backward()
        return torch.cat([p.grad.flatten() for n, p in sorted(st.named_parameters()) if p.requires_grad])

    ref, got = grads(False), grads(True)
    assert 0 < rel(got, ref) < 0.08


@pytest.mark.parametrize("key,value,match", [
    ("sample.memory", "offload", "sample.memory"),
    ("sample.storage_dtype", "int8", "sample.storage_dtype"),
    ("sample.cache", "teacache", "sample.cache"),
    ("sample.attention_backend", "flash_9", "sample.attention_backend"),
    ("experts.a.storage_dtype", "fp4", "experts.a.storage_dtype"),
])
def test_bad_speed_keys_name_the_key(tmp_path, key, value, match):
    from soe.errors import RecipeError
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe

    with pytest.raises(RecipeError, match=match):
        validate_recipe(load_recipe(str(Path(__file__).parent / "recipes" / "tiny.yaml"), [f"{key}={value}", f"run_dir={tmp_path}"]))


# ---- attention through diffusers' dispatcher ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_attend_equals_sdpa_on_cpu_with_and_without_a_mask(backend):
    import torch.nn.functional as F

    from soe.plugin.attention import attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    bias = torch.zeros(2, 1, 5, 7).masked_fill_(torch.rand(2, 1, 5, 7, generator=g) < 0.3, float("-inf"))
    bias[..., 0] = 0  # every query sees at least one key
    for m in (None, bias):
        torch.testing.assert_close(attend(q, k, v, m, backend), F.scaled_dot_product_attention(q, k, v, attn_mask=m), rtol=1e-6, atol=1e-6)


def test_a_masked_call_leaves_a_backend_without_masks_for_sdpa(monkeypatch):
    from diffusers.models import attention_dispatch

    from soe.plugin import attention

    seen = []  # soe.plugin.attention imports the dispatcher when attention runs: patched where it lives
    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", lambda q, k, v, attn_mask=None, backend=None: seen.append(backend) or q)
    q = torch.zeros(1, 1, 2, 4)
    attention.attend(q, q, q, None, "sage")
    attention.attend(q, q, q, torch.zeros(1, 1, 2, 2), "sage")
    attention.attend(q, q, q, torch.zeros(1, 1, 2, 2), "_native_math")
    assert [str(getattr(b, "value", b)) for b in seen] == ["sage", "native", "_native_math"]


def test_windowed_parallel_attention_is_the_value_of_its_own_time_step():
    """Why the windowed branch gathers instead of attending: a softmax over one allowed key is that key."""
    import torch.nn.functional as F

    from soe.stitch.attention_kv import _window_bias

    g = torch.Generator().manual_seed(1)
    q_step = torch.arange(4).repeat_interleave(6)  # 4 steps x 6 tokens
    q, ke, ve = torch.randn(2, 3, 24, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    ref = F.scaled_dot_product_attention(q, ke, ve, attn_mask=_window_bias(q_step, torch.arange(4), q.dtype))
    torch.testing.assert_close(ve.index_select(2, q_step), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["native", "_native_math"])
def test_every_softmax_attention_of_the_fused_model_takes_the_backend_and_stays_exact(backend, monkeypatch):
    from diffusers.models import attention_dispatch

    st, ba, bb = fused()
    with torch.no_grad():
        ref = st(ba, bb)
        apply_speed(st, SpeedConfig(attention_backend=backend), "cpu")
        used = []
        real = attention_dispatch.dispatch_attention_fn
        monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", lambda *a, **kw: used.append(kw["backend"]) or real(*a, **kw))
        got = st(ba, bb)
    assert len(used) > 0 and {str(getattr(b, "value", b)) for b in used} == {backend}  # soe's processors and ACE-Step's
    for g_, r in zip(got, ref):
        torch.testing.assert_close(g_, r, rtol=1e-5, atol=1e-6)


def test_an_attention_backend_whose_package_is_missing_is_refused_in_one_line():
    from soe.errors import RecipeError
    from soe.schema import build

    with pytest.raises(RecipeError, match=r"^sample\.attention_backend: backend 'sage' needs the package sageattention") as err:
        build(SpeedConfig, {"attention_backend": "sage"}, "sample")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="sample.attention_backend: expected null or one of"):
        build(SpeedConfig, {"attention_backend": "flash_3"}, "sample")


def test_sampling_casts_connectors_and_kv_projections_to_the_experts_bf16_within_bf16_tolerance():
    from soe.sample.speed import cast_stitch_modules

    def build():
        st, _, _ = fused()
        for e in (st.a, st.b):
            e.model.to(torch.bfloat16)
        if st.fusion is not None:
            st.fusion.inserted.to(torch.bfloat16)
        return st

    ref_st, st = build(), build()
    stitch_params = lambda s: [p for m in (*s.connectors.values(), *s.fusion.kv.values()) for p in m.parameters()]  # noqa: E731
    assert {p.dtype for p in stitch_params(ref_st)} == {torch.float32}  # built (and trained) in float32
    cond, settings = _conditions(ref_st), SamplerConfig(steps=4, guidance={"a": 1.2, "b": 5.0})
    ref = sample_stitched(ref_st, cond, 1.0, settings)
    apply_speed(st, SpeedConfig(), "cpu")
    assert {p.dtype for p in stitch_params(st)} == {torch.bfloat16}
    assert cast_stitch_modules(st) == []  # nothing left to cast
    got = sample_stitched(st, cond, 1.0, settings)
    for k in ref:
        assert 0 < rel(got[k], ref[k]) < 2e-2  # bf16 has 8 mantissa bits (~0.4% per weight)
