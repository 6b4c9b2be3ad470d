"""UniVerse-1 fidelity: depth expansion, attention key/value injection, taps, and the converter."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for, tiny
from safetensors.torch import save_file

from soe import Stitcher, get_expert
from soe.interop.convert import convert_universe1
from soe.stitch.depth import insertion_points
from soe.train.trained import load_trained

# The published fusion (recipes/universe1.yaml), on tiny experts: wan 4 blocks, ace-step 2 -> 4.
INJECT = {
    "b_to_a": dict(mode="attention_kv", tap="after_self_attn", targets=[
        dict(attention="attn1", mode="parallel", window=True, pre_norm="norm1", copy_from="attn2", cfg_mask=False),
        dict(attention="attn2", mode="concat", pre_norm="norm2", rope="complex", rope_query=True, copy_from="attn2")]),
    "a_to_b": dict(mode="attention_kv", tap="cross_attn_input", targets=[
        dict(attention="cross_attn", rope="cat", rope_theta=1e6)]),
}
DEPTH = {"mode": "insert_interpolated", "every": 1}


def fused(seed=0, **kw):
    a, b = tiny("wan2.1", seed), tiny("ace-step", seed + 1)
    torch.manual_seed(seed + 2)
    st = Stitcher(a, b, pairs="identity", depth=DEPTH, inject=INJECT, connector={"init": "trunc_normal"}, **kw)
    return st, batch_for(a, 2, 1.0, seed=3), batch_for(b, 2, 1.0, seed=4)


def test_insertion_points_universe1_and_errors():
    assert insertion_points(24, 30, 4) == [3, 7, 11, 15, 19, 23]  # every 5th fused block is new
    assert len(insertion_points(24, 30)) == 6
    with pytest.raises(ValueError, match="depth.every"):
        insertion_points(24, 30, 5)


def test_inserted_blocks_are_neighbour_means_and_live_in_the_stitcher():
    a, b = tiny("wan2.1"), tiny("ace-step", 1)
    keys_b = list(b.state_dict())
    st = Stitcher(a, b, pairs="identity", depth=DEPTH)
    assert list(b.state_dict()) == keys_b  # the expert is untouched
    stack = st.fusion.stacks["b"]
    assert [stack.is_inserted(k) for k in range(4)] == [False, True, False, True]
    mid, b0, b1 = stack.module(b, 1), b.blocks[0], b.blocks[1]
    for (n, p), p0, p1 in zip(mid.named_parameters(), b0.parameters(), b1.parameters()):
        torch.testing.assert_close(p, (p0 + p1) / 2, msg=n)
    last = stack.module(b, 3)  # closes the stack: a copy of its left neighbour
    assert all(torch.equal(p, q) for p, q in zip(last.parameters(), b1.parameters()))
    assert {n.split(".")[3] for n, _ in st.named_parameters() if n.startswith("fusion.inserted.b.")} == {"01", "03"}


def test_depth_with_additive_zero_connectors_equals_the_expanded_stack():
    a, b = tiny("wan2.1"), tiny("ace-step", 1)
    st = Stitcher(a, b, pairs="identity", depth=DEPTH)  # add, zero-init
    ba, bb = batch_for(a), batch_for(b)
    with torch.no_grad():
        pa, pb = st(ba, bb)
        s = b.embed(bb)
        for k in range(4):
            s = st.fusion.stacks["b"].run(b, k, s)
        assert torch.equal(pa, a(ba)) and torch.equal(pb, b.head(s, bb))


@pytest.mark.parametrize("name, path", [("wan2.1", "attn1"), ("wan2.1", "attn2"), ("ace-step", "cross_attn")])
def test_attention_qkv_reproduces_the_processor(name, path):
    """The contract attention_kv relies on: softmax(q k^T + mask) v through to_out == the processor."""
    e = tiny(name)
    batch = batch_for(e)
    seen = {}
    attn = e.blocks[0].get_submodule(path)
    h = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    hout = attn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        e(batch)
        h.remove(), hout.remove()
        kwargs = {k: v for k, v in seen["kwargs"].items() if k != "hidden_states"} if seen["args"] else dict(seen["kwargs"])
        q, k, v, bias = e.attention_qkv(attn, seen["args"], kwargs)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
    torch.testing.assert_close(out, seen["out"], rtol=1e-5, atol=1e-5)


def test_fused_stitch_runs_idle_experts_unchanged_and_unstitch_restores():
    st, ba, bb = fused()
    with torch.no_grad():
        ref_a, ref_b = st.a(ba), st.b(bb)  # wrapped processors and hooks are idle outside a call
        pa, pb = st(ba, bb)
        assert pa.shape == ref_a.shape and pb.shape == ref_b.shape
        assert not torch.allclose(pa, ref_a) and not torch.allclose(pb, ref_b)
        assert torch.equal(st.a(ba), ref_a) and torch.equal(st.b(bb), ref_b)
        st.unstitch()
        assert all(type(m.processor).__name__ != "KVProcessor" for m in st.a.modules() if hasattr(m, "processor"))
        assert all(not blk._forward_pre_hooks for blk in (*st.a.blocks, *st.b.blocks))
        assert torch.equal(st.a(ba), ref_a) and torch.equal(st.b(bb), ref_b)


def test_new_kv_projections_start_as_copies_and_gradients_reach_exactly_the_new_modules():
    st, ba, bb = fused()
    kv = st.fusion.kv["b_to_a"]["00"]["attn1"]
    assert torch.equal(kv.k.weight, st.a.blocks[0].attn2.to_k.weight)  # copy_from: attn2 (text k/v)
    assert torch.equal(kv.norm_k.weight, st.a.blocks[0].attn2.norm_k.weight)
    st.a.requires_grad_(False)
    st.b.requires_grad_(False)
    pa, pb = st(ba, bb)
    (pa.square().mean() + pb.square().mean()).backward()
    grads = {n for n, p in st.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("connectors.a_to_b") for n in grads) and any(n.startswith("connectors.b_to_a") for n in grads)
    assert any(n.startswith("fusion.kv.a_to_b") for n in grads) and any(n.startswith("fusion.kv.b_to_a") for n in grads)
    assert any(n.startswith("fusion.inserted.b") for n in grads)
    assert all(n.startswith(("connectors.", "fusion.")) for n in grads)


def test_cfg_mask_zeroes_injected_tokens_per_sample():
    """The unconditional half sees zeroed cross-modal tokens (after the host pre-norm, as released);
    the conditional half is unaffected by the mask."""
    st, ba, bb = fused()
    with torch.no_grad():
        pa, pb = st(ba, bb)
        ma, mb = st(ba, bb, source_mask=torch.tensor([1.0, 0.0]))
    assert torch.equal(ma[0], pa[0]) and torch.equal(mb[0], pb[0])
    assert not torch.allclose(ma[1], pa[1]) and not torch.allclose(mb[1], pb[1])


def _released_tiny_checkpoint(st) -> dict:
    """Random tensors under the released UniVerseTransformer3DModel names (modeling_universe.py)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
    a, b = st.a.model, st.b.model
    out = {}
    for name, t in a.state_dict().items():  # Wan modules keep their names
        out[name] = rnd(t)
    for name, t in b.state_dict().items():
        if not name.startswith("transformer_blocks."):
            out[name] = rnd(t)
    blk = b.transformer_blocks[0].state_dict()
    for k in range(len(a.blocks)):
        for name, t in blk.items():
            if name.startswith("cross_attn.") and name.split(".")[1] in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
                continue  # mel_cross_attn has context_pre_only=None: no add_q_proj/to_add_out; add_k/v are the video k/v
            out[f"blocks.{k}.mel_{name}"] = rnd(t)
        d_v, d_a = st.a.hidden_size, st.b.hidden_size
        for p in ("add_k_proj", "add_v_proj"):  # released (added_kv_proj_dim), unused by the linear self-attention
            out[f"blocks.{k}.mel_attn.{p}.weight"] = torch.randn(d_a, d_a, generator=g)
            out[f"blocks.{k}.mel_attn.{p}.bias"] = torch.randn(d_a, generator=g)
        for attn in ("attn1", "attn2"):
            for p in ("add_k_proj", "add_v_proj"):
                out[f"blocks.{k}.{attn}.{p}.weight"] = torch.randn(d_v, d_v, generator=g)
                out[f"blocks.{k}.{attn}.{p}.bias"] = torch.randn(d_v, generator=g)
            out[f"blocks.{k}.{attn}.norm_added_k.weight"] = torch.randn(d_v, generator=g)
        for p in ("add_k_proj", "add_v_proj"):
            out[f"blocks.{k}.mel_cross_attn.{p}.weight"] = torch.randn(d_a, d_a, generator=g)
            out[f"blocks.{k}.mel_cross_attn.{p}.bias"] = torch.randn(d_a, generator=g)
        for seq, (i, o) in (("mel_to_vid", (d_a, d_v)), ("vid_to_mel", (d_v, d_a))):
            out[f"blocks.{k}.{seq}.0.weight"] = torch.randn(d_a + d_v, i, generator=g)
            out[f"blocks.{k}.{seq}.0.bias"] = torch.randn(d_a + d_v, generator=g)
            out[f"blocks.{k}.{seq}.2.weight"] = torch.randn(o, d_a + d_v, generator=g)
            out[f"blocks.{k}.{seq}.2.bias"] = torch.randn(o, generator=g)
    return out


def test_convert_universe1_maps_every_released_tensor(tmp_path):
    from safetensors.torch import save_file

    st, _, _ = fused()
    released = _released_tiny_checkpoint(st)
    (tmp_path / "src").mkdir()
    save_file(released, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    counts = convert_universe1(tmp_path / "src", tmp_path / "dst", num_audio_blocks=2, every=1)
    assert counts["dropped"] == 4 * len(st.a.blocks)  # only mel_attn.add_{k,v}_proj (unused by the released forward)
    load_trained(st, tmp_path / "dst")
    mine = st.state_dict()
    checks = {
        "blocks.2.attn1.to_q.weight": "a.model.blocks.2.attn1.to_q.weight",
        "patch_embedding.weight": "a.model.patch_embedding.weight",
        "blocks.0.mel_cross_attn.to_k.weight": "b.model.transformer_blocks.0.cross_attn.to_k.weight",
        "blocks.1.mel_ff.inverted_conv.conv.weight": "fusion.inserted.b.01.ff.inverted_conv.conv.weight",
        "blocks.2.mel_scale_shift_table": "b.model.transformer_blocks.1.scale_shift_table",
        "blocks.3.mel_attn.to_v.bias": "fusion.inserted.b.03.attn.to_v.bias",
        "blocks.1.attn1.add_k_proj.weight": "fusion.kv.b_to_a.01.attn1.k.weight",
        "blocks.1.attn2.norm_added_k.weight": "fusion.kv.b_to_a.01.attn2.norm_k.weight",
        "blocks.3.mel_cross_attn.add_v_proj.bias": "fusion.kv.a_to_b.03.cross_attn.v.bias",
        "blocks.0.mel_to_vid.0.weight": "connectors.b_to_a.00.mlp.fc1.weight",
        "blocks.2.vid_to_mel.2.bias": "connectors.a_to_b.02.mlp.fc2.bias",
        "lyric_proj.weight": "b.model.lyric_proj.weight",
    }
    for old, new in checks.items():
        assert torch.equal(mine[new], released[old]), (old, new)
    assert counts["connectors"] == len(st.connectors.state_dict())  # every connector tensor came from the release
    assert counts["fusion"] >= len(st.fusion.kv.state_dict())


def test_fused_stitch_samples_jointly_with_cfg():
    """The UniVerse-1 fusion runs through the joint sampler (UniPC, shift 15, CFG video 1.2 / audio 5.0)."""
    from soe.sample.sampler import sample_stitched
    from soe.schema import SamplerConfig

    st, _, _ = fused()
    st.eval()
    cond = {"a": st.a.conditioning(1, 1.0, torch.Generator().manual_seed(0)),
            "b": st.b.conditioning(1, 1.0, torch.Generator().manual_seed(1))}
    s = SamplerConfig(steps=3, scheduler="unipc", guidance={"a": 1.2, "b": 5.0}, shift={"a": 15.0, "b": 15.0})
    x, y = sample_stitched(st, cond, 1.0, s), sample_stitched(st, cond, 1.0, s)
    for k in ("a", "b"):
        assert torch.isfinite(x[k]).all() and torch.equal(x[k], y[k])


def _write_release(tmp_path, st, **config):
    import json

    released = _released_tiny_checkpoint(st)
    src = tmp_path / "release"
    src.mkdir()
    save_file(released, src / "diffusion_pytorch_model.safetensors")
    (src / "config.json").write_text(json.dumps({"_class_name": "UniVerseTransformer3DModel", "num_layers": 4, **config}))
    return src, released


@pytest.mark.slow
def test_convert_reads_block_counts_and_architecture_from_the_release(tmp_path):
    """No block count is assumed: 4 fused blocks with one inserted after every audio block -> 2 ACE-Step
    blocks; the sizes a recipe needs come back in universe1.json and build a stitch that loads strictly."""
    import json

    from soe.cli import main

    st, ba, bb = fused()
    src, released = _write_release(tmp_path, st, attention_head_dim=16, num_attention_heads=2, mel_num_attention_heads=4,
                                   mlp_ratio=2.5, ssl_names=["mert", "m-hubert"], ssl_encoder_depths=[1, 1])
    assert main(["convert", "universe1", str(src), str(tmp_path / "dst"), "--every", "1"]) == 0
    meta = json.loads((tmp_path / "dst" / "universe1.json").read_text())
    assert (meta["fused_blocks"], meta["audio_blocks"], meta["inserted_after"]) == (4, 2, [0, 1])
    ace, wan = meta["architecture"]["b"], meta["architecture"]["a"]
    cfg_b = st.b.model.config
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "speaker_embedding_dim", "text_embedding_dim",
                "lyric_encoder_vocab_size", "lyric_hidden_size", "lyric_encoder_layers", "lyric_encoder_heads",
                "lyric_encoder_ff_dim", "ssl_latent_dims"):
        assert ace[key] == (list(cfg_b[key]) if isinstance(cfg_b[key], (list, tuple)) else cfg_b[key]), key
    assert wan["num_layers"] == len(st.a.blocks) and ace["inner_dim"] == st.b.hidden_size

    # an explicit audio depth wins; a depth the fused blocks cannot come from is one line, exit 2
    assert main(["convert", "universe1", str(src), str(tmp_path / "dst2"), "--every", "1", "--audio-blocks", "2"]) == 0
    assert main(["convert", "universe1", str(src), str(tmp_path / "dst3"), "--audio-blocks", "3"]) == 2
    assert not (tmp_path / "dst3").exists()

    # every converted tensor is used: changing any one released block tensor changes a prediction
    load_trained(st, tmp_path / "dst")
    st.eval()
    with torch.no_grad():
        ref = st(ba, bb)
        for name in ("blocks.3.mel_ff.point_conv.conv.weight", "blocks.1.mel_cross_attn.add_k_proj.weight",
                     "blocks.2.attn1.add_v_proj.weight"):
            save_file(dict(released, **{name: released[name] * 1.5}), src / "diffusion_pytorch_model.safetensors")
            convert_universe1(src, tmp_path / "scratch", every=1, force=True)  # replaces the previous round's files
            load_trained(st, tmp_path / "scratch")
            got = st(ba, bb)
            assert not all(torch.allclose(g, r) for g, r in zip(got, ref)), name


def test_convert_refuses_a_folder_that_is_not_a_universe1_release(tmp_path, capsys):
    from safetensors.torch import save_file

    from soe.cli import main

    (tmp_path / "wan").mkdir()
    save_file({"blocks.0.attn1.to_q.weight": torch.ones(2, 2)}, tmp_path / "wan" / "diffusion_pytorch_model.safetensors")
    assert main(["convert", "universe1", str(tmp_path / "wan"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "not a UniVerse-1 transformer" in err and len(err.strip().splitlines()) == 1
    assert main(["convert", "universe1", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert not (tmp_path / "dst").exists()


def test_speaker_token_option():
    """UniVerse-1 conditions audio on [text, lyrics]: no speaker token, the speaker embedding unused."""
    e = tiny("ace-step", 1)
    b = batch_for(e, 2, 1.0, seed=5)
    with torch.no_grad():
        with_token = e(b)
        e.speaker_token = False
        state = e.embed(b)
        assert state.extras["encoder_hidden_states"].shape[1] == b["text_hidden_states"].shape[1] + b["lyric_token_ids"].shape[1]
        without = e(b)
        assert torch.equal(e.split_forward(b), without) and not torch.allclose(without, with_token)
        assert torch.equal(e({**b, "speaker_embeds": torch.randn_like(b["speaker_embeds"])}), without)


def test_null_branch_keeps_masks_and_zeroes_ids():
    e = tiny("ace-step", 1)
    b = batch_for(e, 2, 1.0, seed=5)
    null = e.unconditional(b)
    assert torch.equal(null["lyric_mask"], b["lyric_mask"]) and torch.equal(null["text_attention_mask"], b["text_attention_mask"])
    assert not null["lyric_token_ids"].any() and not null["text_hidden_states"].any() and not null["speaker_embeds"].any()


def test_padding_of_text_and_lyrics_does_not_change_the_audio_prediction():
    """Real tokens are packed first, so extra padding (soe's fixed-length text encoders) gives exactly the
    prediction of the unpadded conditioning (the official pipelines), with or without the speaker token."""
    e = tiny("ace-step", 1)
    b = batch_for(e, 1, 1.0, seed=5)

    def pad(x, n):
        return torch.cat([x, x.new_zeros(x.shape[0], n, *x.shape[2:])], 1)

    padded = {**b, "text_hidden_states": pad(b["text_hidden_states"], 3), "text_attention_mask": pad(b["text_attention_mask"], 3),
              "lyric_token_ids": pad(b["lyric_token_ids"], 4), "lyric_mask": pad(b["lyric_mask"], 4)}
    with torch.no_grad():
        for speaker in (True, False):
            e.speaker_token = speaker
            torch.testing.assert_close(e(padded), e(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seconds", [5.0, 5.1, 4.96, 1.0, 0.2])
def test_video_and_audio_latent_counts_agree_for_the_same_clip(seconds):
    """Wan at 25 fps and ACE-Step at 25.6 kHz both run at 6.25 latents/s: the same clip gives the same count
    (5.1 s used to give 32 video vs 31 audio), and the video latents cover 1 + 4k frames of the clip."""
    from soe.data.windows import window_spec

    wan = tiny("wan2.1")
    ace = get_expert("ace-step").from_preset("tiny", sample_rate=25600)
    t_video, t_audio = wan.latent_shape(1, seconds)[2], ace.latent_shape(1, seconds)[-1]
    assert t_video == t_audio == math.ceil(round(seconds * 6.25, 6))
    spec = window_spec(seconds, ("a", wan), ("b", ace), 25.0, 25600)
    assert spec.video_frames == 1 + 4 * (t_video - 1) and spec.audio_samples == spec.video_frames * 1024
    assert spec.latent_frames == {"a": t_video, "b": t_audio}


def test_fused_stitch_trains_under_gradient_checkpointing():
    """The recipe trains with gradient checkpointing on both experts: recomputing a host block in
    backward recomputes its connector tokens too, and the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        st, ba, bb = fused()
        st.train()
        st.a.set_gradient_checkpointing(checkpointing)
        st.b.set_gradient_checkpointing(checkpointing)
        pa, pb = st(ba, bb)
        (pa.square().mean() + pb.square().mean()).backward()
        grads.append({n: p.grad.clone() for n, p in st.named_parameters() if n.startswith(("connectors.", "fusion.")) and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("connectors.") for k in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
