"""Generic contract tests, run over every registered expert through ``soe.testing`` (the same checks
plugin authors run), plus the family-specific facts (real sizes, token rates)."""
import math

import pytest
import torch
from conftest import batch_for, tiny

from soe import get_expert
from soe.testing import run_check


def holds(check: str, expert_name: str, **kwargs) -> None:
    result = run_check(check, expert_name, **kwargs)
    assert result.passed, str(result)


def test_class_attributes_and_dummy_batch(expert_name):
    holds("attributes", expert_name)


def test_split_forward_equals_native_forward(expert_name):
    holds("split_forward", expert_name)  # at 1.0 s and 1.6 s, rtol = atol = 1e-5


def test_token_layout_agrees_with_hidden_state(expert_name):
    holds("token_layout", expert_name)


def test_block_hidden_roundtrip_through_hooks(expert_name):
    """A forward hook that re-inserts each block's own hidden state changes nothing."""
    holds("hook_roundtrip", expert_name)


def test_fresh_stitch_with_a_builtin_partner_reproduces_native_outputs(expert_name):
    holds("zero_init_stitch", expert_name)


def test_gradient_checkpointing_gives_same_gradients(expert_name):
    holds("gradient_checkpointing", expert_name)


def test_every_preset_builds_on_meta_without_memory(expert_name):
    holds("meta_presets", expert_name)


def test_lora_targets_match_modules(expert_name):
    holds("lora_targets", expert_name)


def test_unconditional_batch_zeroes_only_condition_keys(expert_name):
    holds("unconditional", expert_name)


def test_save_load_roundtrip(expert_name):
    holds("save_load", expert_name)


def _meta_params(name: str, preset: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in get_expert(name).from_preset(preset, device="meta").parameters())


def test_wan_real_sizes_on_meta():
    assert _meta_params("wan2.1", "1.3b") == 1_418_996_800  # Wan2.1-T2V-1.3B
    assert _meta_params("wan2.1", "14b") == 14_288_491_584  # Wan2.1-T2V-14B


def test_wan_layout_is_6_25_latent_frames_per_second_at_25_fps():
    e = tiny("wan2.1")
    layout = e.token_layout(batch_for(e, 1, 2.0))
    assert layout.axes == ("t", "h", "w") and layout.time_rate == 6.25
    assert layout.grid == (math.ceil(2.0 * 6.25), 4, 4)  # 50 frames = 1 + 4 * 12.25: 13 latents cover them


def test_ace_step_15_layout_is_12_5_tokens_per_second():
    e = tiny("ace-step-1.5")
    b = batch_for(e, 1, 1.0)
    assert b["latents"].shape[1] == 25  # 25 latent frames/s
    layout = e.token_layout(b)
    assert layout.axes == ("t",) and layout.time_rate == 12.5 and layout.grid == (13,)  # odd length: last patch padded


@pytest.mark.parametrize("check", ["split_forward", "gradient_checkpointing"])
def test_checks_accept_an_instance(check):
    holds(check, tiny("wan2.1"))
