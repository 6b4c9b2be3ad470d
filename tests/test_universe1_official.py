"""`soe convert universe1` reproduces the released model's forward, checked against the OFFICIAL code.

Skipped unless ``SOE_UNIVERSE1_CODE`` points at a checkout of Dorniwang/UniVerse-1-code (never
vendored here). The official ``UniVerseTransformer3DModel`` is built tiny with random non-zero
weights, saved in the released layout, converted by ``soe convert universe1`` and loaded into
``recipes/universe1.yaml`` at the sizes ``universe1.json`` reports; both predictions of the
conditional call and of the CFG call (null branch first, as the official pipeline batches it) must
agree to 1e-4 in fp32. The official pipeline feeds text and lyrics unpadded; soe gets them padded to
a fixed length with masks (as its text encoders and latent cache do) and must give the same result. flash-attn and einops do not load on CPU: they are replaced by the same math
(SDPA) before the official module is imported.

    SOE_UNIVERSE1_CODE=/path/to/UniVerse-1-code python -m pytest -q tests/test_universe1_official.py
"""
import functools
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

CODE = os.environ.get("SOE_UNIVERSE1_CODE")
pytestmark = pytest.mark.skipif(not CODE, reason="set SOE_UNIVERSE1_CODE to a Dorniwang/UniVerse-1-code checkout")
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "universe1.yaml"


def _sdpa(q, k, v, softmax_scale=None, causal=False):  # flash-attn's (B, S, H, d) layout
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, scale=softmax_scale).transpose(1, 2)


def _official_module():
    flash = types.ModuleType("fastvideo.models.flash_attn_no_pad")
    flash.flash_attn_no_pad = lambda qkv, mask, causal=False, dropout_p=0.0, softmax_scale=None: _sdpa(*qkv.unbind(2), softmax_scale, causal)
    flash.flash_attn_kvpacked_func = lambda q, kv, dropout_p=0.0, softmax_scale=None, causal=False: _sdpa(q, *kv.unbind(2), softmax_scale, causal)
    flash.flash_attn_varlen_kvpacked_func = None
    sys.modules["fastvideo.models.flash_attn_no_pad"] = flash
    try:
        import einops  # noqa: F401
    except ImportError:
        sys.modules["einops"] = types.ModuleType("einops")
        sys.modules["einops"].rearrange = None
    sys.path.insert(0, CODE)
    import fastvideo.models.wan.modeling_universe as mu
    from fastvideo.models.lyrics_utils.lyric_encoder import ConformerEncoder

    # the release hard-wires a 1024-wide, 6-block lyric conformer: the same class, smaller
    mu.LyricEncoder = functools.partial(ConformerEncoder, output_size=32, attention_heads=2, linear_units=64, num_blocks=1)
    return mu


def _official_tiny(mu, folder: Path, num_layers: int):
    torch.manual_seed(0)
    model = mu.UniVerseTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=48, num_layers=num_layers, added_kv_proj_dim=24, mel_num_attention_heads=3, mlp_ratio=2.5,
        speaker_embedding_dim=16, text_embedding_dim=20, ssl_encoder_depths=[1, 1], ssl_latent_dims=[8, 6],
        lyric_encoder_vocab_size=50, lyric_hidden_size=32).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random, non-zero everywhere (norm gains around 1)
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) + float("norm" in name and p.ndim == 1))
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("num_layers", [5, 10])
def test_converted_release_matches_the_official_forward(tmp_path, num_layers):
    from soe.cli import main
    from soe.recipe.builders import build_stitcher
    from soe.recipe.reading import load_recipe
    from soe.train.trained import load_trained

    mu = _official_module()
    model = _official_tiny(mu, tmp_path / "transformer", num_layers)
    g = torch.Generator().manual_seed(2)
    vid, mel = torch.randn(1, 4, 3, 4, 6, generator=g), torch.randn(1, 8, 16, 3, generator=g)
    ambient, ambient_mask = torch.randn(1, 4, 20, generator=g), torch.ones(1, 4, dtype=torch.long)
    ut5, ut5_neg, speech = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g), torch.randint(1, 50, (1, 9), generator=g)
    pad = lambda x, n: torch.cat([x, x.new_zeros(x.shape[0], n, *x.shape[2:])], 1)  # noqa: E731  soe's fixed-length padding
    t = torch.tensor([637.0])
    two = lambda u, c: torch.cat([u, c])  # noqa: E731  the official pipeline: [null, conditional]
    vid_null = vid.clone()
    vid_null[:, :, :1] = 0  # its null branch gets a zero reference frame
    with torch.no_grad():
        ref_cond = model(hidden_states_ref=vid[:, :, :1], hidden_states_vid=vid, hidden_states_mel=mel, timestep=t,
                         encoder_hidden_states_ambient=ambient, speech_token=speech, encoder_hidden_states_ut5=ut5,
                         audio_text_attention_mask=ambient_mask, return_dict=False, is_cfg=False)[0]
        ref_cfg = model(hidden_states_ref=two(vid_null[:, :, :1], vid[:, :, :1]), hidden_states_vid=two(vid, vid),
                        hidden_states_mel=two(mel, mel), timestep=t.expand(2), encoder_hidden_states_ambient=two(ambient * 0, ambient),
                        speech_token=two(speech * 0, speech), encoder_hidden_states_ut5=two(ut5_neg, ut5),
                        audio_text_attention_mask=two(ambient_mask, ambient_mask), return_dict=False, is_cfg=True)[0]

    assert main(["convert", "universe1", str(tmp_path / "transformer"), str(tmp_path / "soe")]) == 0
    meta = json.loads((tmp_path / "soe" / "universe1.json").read_text())
    assert meta["fused_blocks"] == num_layers and meta["audio_blocks"] == num_layers * 4 // 5
    arch = meta["architecture"]
    overrides = ["experts.a.path=null", "experts.b.path=null", "experts.a.dtype=float32", "experts.b.dtype=float32",
                 f"experts.a.architecture={json.dumps(arch['a'])}", f"experts.b.architecture={json.dumps(arch['b'])}",
                 "experts.a.options={fps: 25, height: 32, width: 48}", "trainer.accelerator=cpu", "trainer.devices=1"]
    st = build_stitcher(load_recipe(RECIPE, overrides))
    load_trained(st, tmp_path / "soe")
    st.eval()

    def batches(video, text, lyric_ids, ambient_states, n):
        a = {"latents": video, "timestep": t.expand(n) / 1000, "encoder_hidden_states": text}
        b = {"latents": mel.expand(n, -1, -1, -1), "timestep": t.expand(n) / 1000, "text_hidden_states": pad(ambient_states, 3),
             "text_attention_mask": pad(ambient_mask, 3).expand(n, -1), "speaker_embeds": torch.zeros(n, 16),
             "lyric_token_ids": pad(lyric_ids, 5), "lyric_mask": pad(torch.ones_like(lyric_ids), 5)}
        return a, b

    with torch.no_grad():
        got_cond = st(*batches(vid, ut5, speech, ambient, 1))
        a, b = batches(vid, ut5, speech, ambient, 1)
        a_null, b_null = st.a.unconditional(a), st.b.unconditional(b)  # soe's own null branch
        a_null.update(latents=vid_null, encoder_hidden_states=ut5_neg)  # negative prompt embedding, zero reference frame
        cat = lambda u, c: {k: torch.cat([u[k], c[k]]) for k in c}  # noqa: E731
        got_cfg = st(cat(a_null, a), cat(b_null, b), source_mask=torch.tensor([0.0, 1.0]))
    for call, got, ref in (("conditional", got_cond, ref_cond), ("cfg", got_cfg, ref_cfg)):
        for side, g_, r in zip(("video", "audio"), got, ref):
            print(f"{num_layers} fused blocks, {call} {side}: max |soe - official| = {(g_ - r).abs().max():.2e} (max |official| {r.abs().max():.1f})")
            torch.testing.assert_close(g_, r, rtol=0, atol=1e-4)
