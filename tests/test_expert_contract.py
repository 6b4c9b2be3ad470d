"""Generic contract tests, run over every registered expert."""
import pytest
import torch

from conftest import batch_for, tiny
from soe import get_expert


@pytest.mark.parametrize("seconds", [1.0, 1.6])
def test_split_forward_equals_native_forward(expert_name, seconds):
    e = tiny(expert_name)
    b = batch_for(e, 2, seconds)
    with torch.no_grad():
        native, split = e(b), e.split_forward(b)
    assert native.shape == b["latents"].shape
    torch.testing.assert_close(split, native, rtol=1e-5, atol=1e-5)


def test_token_layout_agrees_with_hidden_state(expert_name):
    e = tiny(expert_name)
    b = batch_for(e, 2, 1.0)
    layout = e.token_layout(b)
    with torch.no_grad():
        state = e.embed(b)
        assert state.hidden.shape == (2, layout.num_tokens, e.hidden_size)
        state = e.run_block(0, state)
    assert state.hidden.shape == (2, layout.num_tokens, e.hidden_size)
    # the layout's duration matches the requested clip length to within one time step
    assert abs(layout.seconds - 1.0) <= 1.0 / layout.time_rate + 1e-6
    # twice the seconds -> about twice the time steps, same rate
    layout2 = e.token_layout(batch_for(e, 1, 2.0))
    assert layout2.time_rate == layout.time_rate
    assert abs(layout2.num_steps - 2 * layout.num_steps) <= 1


def test_block_hidden_roundtrip_through_hooks(expert_name):
    """A forward hook that re-inserts the block's own hidden state changes nothing."""
    e = tiny(expert_name)
    b = batch_for(e)
    with torch.no_grad():
        ref = e(b)
        h = e.blocks[0].register_forward_hook(lambda m, a, out: e.with_block_output_hidden(out, e.block_output_hidden(out) * 1.0))
        try:
            got = e(b)
        finally:
            h.remove()
    torch.testing.assert_close(got, ref)


def test_gradient_checkpointing_gives_same_gradients(expert_name):
    def grads(ckpt: bool, split: bool):
        e = tiny(expert_name).train()
        e.set_gradient_checkpointing(ckpt)
        b = batch_for(e)
        out = e.split_forward(b) if split else e(b)
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in e.named_parameters() if p.grad is not None}

    for split in (False, True):
        ref, got = grads(False, split), grads(True, split)
        assert ref.keys() == got.keys() and ref
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_every_preset_builds_on_meta_without_memory(expert_name):
    cls = get_expert(expert_name)
    for preset in cls.presets:
        with torch.device("meta"):
            e = cls.from_preset(preset, device="meta")
        assert all(p.device.type == "meta" for p in e.parameters())
        assert e.num_blocks == len(e.blocks) > 0


def test_lora_targets_match_modules(expert_name):
    from soe.lora import match_modules

    e = tiny(expert_name)
    for pattern in e.lora_targets:
        assert match_modules(e.model, [pattern]), pattern


def test_unconditional_batch_zeroes_only_condition_keys(expert_name):
    e = tiny(expert_name)
    b = batch_for(e)
    u = e.unconditional(b)
    assert e.condition_keys
    for k, v in b.items():
        if k in e.condition_keys:
            assert torch.count_nonzero(u[k]) == 0
        else:
            assert u[k] is v


def test_save_load_roundtrip(expert_name, tmp_path):
    e = tiny(expert_name)
    e.save(tmp_path / "ckpt")
    loaded = get_expert(expert_name).load(tmp_path / "ckpt")
    b = batch_for(e)
    with torch.no_grad():
        torch.testing.assert_close(loaded(b), e(b))
    with pytest.raises(FileNotFoundError):
        get_expert(expert_name).load(tmp_path / "nowhere")


def test_wan_real_sizes_on_meta():
    cls = get_expert("wan2.1")
    counts = {}
    for preset in ("1.3b", "14b"):
        with torch.device("meta"):
            counts[preset] = sum(p.numel() for p in cls.from_preset(preset, device="meta").parameters())
    assert counts["1.3b"] == 1_418_996_800  # Wan2.1-T2V-1.3B
    assert counts["14b"] == 14_288_491_584  # Wan2.1-T2V-14B


def test_wan_layout_is_6_25_latent_frames_per_second_at_25_fps():
    e = tiny("wan2.1")
    layout = e.token_layout(batch_for(e, 1, 2.0))
    assert layout.axes == ("t", "h", "w") and layout.time_rate == 6.25
    assert layout.grid == (round(2.0 * 6.25), 4, 4)


def test_ace_step_15_layout_is_12_5_tokens_per_second():
    e = tiny("ace-step-1.5")
    b = batch_for(e, 1, 1.0)
    assert b["latents"].shape[1] == 25  # 25 latent frames/s
    layout = e.token_layout(b)
    assert layout.axes == ("t",) and layout.time_rate == 12.5 and layout.grid == (13,)  # odd length: last patch padded
