"""ACE-Step v1 expert: the split forward equals the model's own, checkpoints round-trip in the
official layout, and the full-size architecture has the released parameter count."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from soe.experts.ace_step import AceStepV1Expert
from soe.experts.ace_step_v1_model import ACEStepTransformer2DModel
from soe.plugin.registry import get_expert

# ace_step_transformer/config.json of ACE-Step/ACE-Step-v1-3.5B, verbatim.
OFFICIAL_CONFIG = {
    "_class_name": "ACEStepTransformer2DModel",
    "_diffusers_version": "0.32.2",
    "attention_head_dim": 128,
    "in_channels": 8,
    "inner_dim": 2560,
    "lyric_encoder_vocab_size": 6693,
    "lyric_hidden_size": 1024,
    "max_height": 16,
    "max_position": 32768,
    "max_width": 32768,
    "mlp_ratio": 2.5,
    "num_attention_heads": 20,
    "num_layers": 24,
    "out_channels": 8,
    "patch_size": [16, 1],
    "rope_theta": 1000000.0,
    "speaker_embedding_dim": 512,
    "ssl_encoder_depths": [8, 8],
    "ssl_latent_dims": [1024, 768],
    "ssl_names": ["mert", "m-hubert"],
    "text_embedding_dim": 768,
}
FULL_SIZE_PARAMS = 3_305_659_264  # measured on the meta device; "3.5B" in the model's name


@pytest.fixture(scope="module")
def expert():
    return AceStepV1Expert.tiny(seed=0).eval()


@pytest.fixture
def batch(expert):
    return expert.dummy_batch(batch_size=2, seconds=1.5, generator=torch.Generator().manual_seed(0))


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_and_tiny_is_small(expert):
    assert get_expert("ace-step") is AceStepV1Expert
    assert 100_000 < n_params(expert) < 2_000_000
    assert expert.num_blocks == 2 and expert.hidden_size == 64


def test_split_forward_equals_native_forward(expert, batch):
    with torch.no_grad():
        native = expert(batch)
        split = expert.split_forward(batch)
    assert native.shape == batch["latents"].shape
    torch.testing.assert_close(split, native, atol=1e-5, rtol=1e-5)


def test_latent_padding_mask_is_used(expert, batch):
    batch["attention_mask"] = torch.ones(2, batch["latents"].shape[-1])
    batch["attention_mask"][1, -4:] = 0
    with torch.no_grad():
        out = expert(batch)
        torch.testing.assert_close(expert.split_forward(batch), out, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_token_layout_matches_hidden_state(expert, batch):
    layout = expert.token_layout(batch)
    state = expert.embed(batch)
    assert layout.axes == ("t",) and layout.grid == (batch["latents"].shape[-1],)
    assert state.hidden.shape == (2, layout.num_tokens, expert.hidden_size)
    assert expert.latent_shape(2, 1.5) == tuple(batch["latents"].shape)


def test_time_rate_follows_sample_rate():
    default = AceStepV1Expert.tiny()
    assert default.latent_rate == pytest.approx(44100 / 512 / 8)  # ~10.77 frames/s
    assert default.latent_shape(1, 10.0)[-1] == math.ceil(10.0 * 44100 / 512 / 8)  # whole latents covering 10 s
    universe = AceStepV1Expert.tiny(sample_rate=25600)  # UniVerse-1's setting
    assert universe.latent_rate == pytest.approx(6.25)
    batch = universe.dummy_batch(seconds=2.0)
    assert batch["latents"].shape[-1] == 13  # 12.5 latent frames of time: 13 cover it
    assert universe.token_layout(batch).time_rate == pytest.approx(6.25)


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = ACEStepTransformer2DModel.from_config(OFFICIAL_CONFIG)
    n = n_params(model)
    assert abs(n - 3.31e9) / 3.31e9 < 0.01
    assert n == FULL_SIZE_PARAMS
    assert len(model.transformer_blocks) == 24 and model.inner_dim == 2560


def test_presets_match_official_config():
    official = {k: v for k, v in OFFICIAL_CONFIG.items() if not k.startswith("_")}
    assert AceStepV1Expert.presets["3.5b"] == official
    expert = AceStepV1Expert.from_preset("3.5b", device="meta")
    assert n_params(expert) == FULL_SIZE_PARAMS


def test_official_names_in_state_dict(expert):
    keys = set(expert.model.state_dict())
    for name in (
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.0.cross_attn.add_q_proj.weight",  # unused by the forward, present in the checkpoint
        "transformer_blocks.0.cross_attn.to_add_out.bias",
        "transformer_blocks.0.ff.inverted_conv.conv.weight",
        "transformer_blocks.0.ff.point_conv.conv.weight",
        "transformer_blocks.0.scale_shift_table",
        "lyric_encoder.embed.out.0.weight",
        "lyric_encoder.encoders.0.self_attn.pos_bias_u",
        "lyric_encoder.encoders.0.self_attn.linear_pos.weight",
        "lyric_encoder.after_norm.weight",
        "proj_in.early_conv_layers.1.weight",
        "projectors.1.4.weight",
        "t_block.1.weight",
        "final_layer.scale_shift_table",
    ):
        assert name in keys, name
    assert "transformer_blocks.0.ff.point_conv.conv.bias" not in keys


def test_save_load_round_trip_official_layout(expert, batch, tmp_path):
    expert.save(tmp_path)
    folder = tmp_path / "ace_step_transformer"
    assert (folder / "config.json").is_file()
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "ACEStepTransformer2DModel"
    with torch.no_grad():
        ref = expert(batch)
        for path in (tmp_path, folder):  # the checkpoint root or the transformer folder itself
            loaded = AceStepV1Expert.load(path)
            torch.testing.assert_close(loaded(batch), ref, atol=0, rtol=0)


def test_load_missing_files_is_a_clear_error(expert, tmp_path):
    with pytest.raises(FileNotFoundError, match="ace_step_transformer/config.json"):
        AceStepV1Expert.load(tmp_path)
    expert.save(tmp_path)
    (tmp_path / "ace_step_transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        AceStepV1Expert.load(tmp_path)


def test_lora_targets_match_modules(expert):
    names = [n for n, _ in expert.model.named_modules()]
    for pattern in AceStepV1Expert.lora_targets:
        hits = [n for n in names if re.fullmatch(pattern, n)]
        assert hits, f"{pattern} matches no module"
        assert all(isinstance(expert.model.get_submodule(n), (torch.nn.Linear, torch.nn.Conv1d)) for n in hits)


def test_unconditional_zeroes_conditioning(expert, batch):
    uncond = expert.unconditional(batch)
    for k in AceStepV1Expert.condition_keys:
        assert not uncond[k].any()
    with torch.no_grad():
        assert torch.isfinite(expert(uncond)).all()


@pytest.mark.parametrize("path", ["native", "split"])
def test_gradient_checkpointing_same_gradients(path, batch):
    def grads(checkpointing: bool):
        expert = AceStepV1Expert.tiny(seed=0).train()
        expert.set_gradient_checkpointing(checkpointing)
        calls = []
        expert.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the lyric encoder has dropout in train mode
        out = expert(batch) if path == "native" else expert.split_forward(batch)
        out.square().mean().backward()
        return {n: p.grad for n, p in expert.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really was recomputed in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_self_attention_is_relu_kernel_linear_attention(expert):
    """out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j), phi = ReLU, after RoPE on q and k."""
    from soe.experts.ace_step_v1_block import apply_rope

    attn = expert.blocks[0].attn
    x = torch.randn(2, 7, expert.hidden_size)
    rope = expert.model.rotary_emb(x, seq_len=7)
    with torch.no_grad():
        out = attn(x, rotary_freqs_cis=rope)
        split = lambda t: t.view(2, 7, attn.heads, -1).transpose(1, 2)  # noqa: E731  (B, H, S, d)
        q = apply_rope(split(attn.to_q(x)), rope).relu()
        k = apply_rope(split(attn.to_k(x)), rope).relu()
        w = q @ k.transpose(-1, -2)  # (B, H, S, S) unnormalised kernel weights
        ref = (w / w.sum(-1, keepdim=True)) @ split(attn.to_v(x))  # (B, H, S, d)
        ref = attn.to_out[0](ref.transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
