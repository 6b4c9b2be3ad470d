"""The plugin authoring kit: soe.testing reports broken experts precisely, `soe experts check`, the
example third-party package (installed and discovered through entry points), and one-way stitching
into a model that has no plugin at all (soe.stitch.generic)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny
from diffusers import LTXVideoTransformer3DModel
from torch import nn

import soe.plugin.registry as registry
from soe import BlockListExpert, ConnectorConfig, Stitcher, TokenLayout, stitch_into
from soe.cli import main
from soe.experts.wan import WanExpert
from soe.stitch.generic import BlockListError, find_block_list
from soe.testing import assert_expert_contract, check_expert, run_check

ROOT = Path(__file__).parents[1]
PLUGIN = ROOT / "examples" / "plugin_package"


# ---- soe.testing on broken experts: which property broke, and by how much -----------------------
class DriftingWan(WanExpert):
    """Its split forward drifts from the native forward by 1e-3 (a typical re-implementation slip)."""

    def head(self, state, batch):
        return super().head(state, batch) + 1e-3


class UnmatchedLoraWan(WanExpert):
    lora_targets = (r"blocks\.\d+\.attn1\.to_q$", r"blocks\.\d+\.attention\.q_proj$")


class WrongRateWan(WanExpert):
    def token_layout(self, batch):
        layout = super().token_layout(batch)
        return TokenLayout(layout.grid, layout.axes, layout.time_rate * 2)  # claims 12.5 frames/s


def test_split_forward_failure_says_by_how_much():
    result = run_check("split_forward", DriftingWan)
    assert not result.passed
    assert "split vs native forward at 1.0 s" in result.detail and "max |diff| 0.001" in result.detail


def test_lora_failure_names_the_pattern_and_candidates():
    result = run_check("lora_targets", UnmatchedLoraWan)
    assert not result.passed and "attention" in result.detail and "close candidates" in result.detail


def test_layout_failure_gives_the_measured_duration():
    result = run_check("token_layout", WrongRateWan)
    assert not result.passed and "a 1 s batch spans 0.560 s" in result.detail


def test_assert_expert_contract_lists_only_the_broken_properties():
    with pytest.raises(AssertionError) as info:
        assert_expert_contract(DriftingWan, checks=["attributes", "split_forward", "zero_init_stitch"])
    msg = str(info.value)
    assert "[FAIL] split_forward" in msg and "zero_init_stitch" in msg and "attributes" not in msg


def test_a_crashing_check_is_a_failure_naming_the_exception():
    class Broken(WanExpert):
        def embed(self, batch):
            raise RuntimeError("boom")

    result = run_check("token_layout", Broken)
    assert not result.passed and result.detail == "raised RuntimeError: boom"


# ---- the CLI ------------------------------------------------------------------------------------
def test_cli_experts_still_lists(capsys):
    assert main(["experts"]) == 0
    assert "stable-audio-open" in capsys.readouterr().out


def test_cli_experts_check_passes_a_builtin(capsys):
    assert main(["experts", "check", "wan2.2-ti2v", "--check", "split_forward", "--check", "meta_presets"]) == 0
    out = capsys.readouterr().out
    assert "split_forward" in out and "PASS" in out and "4,999,787,712" in out and "2/2 properties hold" in out


def test_cli_experts_check_fails_with_status_1(capsys):
    assert main(["experts", "check", "test_plugins:DriftingWan", "--check", "split_forward", "--check", "lora_targets"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1/2 properties hold, 1 failed" in out


@pytest.mark.parametrize("spec, message", [
    ("wan2.3", "unknown expert 'wan2.3'"),
    ("no_such_pkg.plugin:MyExpert", "cannot import module 'no_such_pkg.plugin'"),
    ("soe.plugin.expert:TokenLayout", "not a subclass of soe.Expert"),
    ("wan2.1 --check speed", "unknown check(s) ['speed']"),
])
def test_cli_experts_check_bad_input_is_one_line_with_status_2(capsys, spec, message):
    assert main(["experts", "check", *spec.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


# ---- the example plugin package ------------------------------------------------------------------
@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    yield
    for name in [m for m in sys.modules if m.startswith("soe_toy_audio")]:
        del sys.modules[name]


def test_example_plugin_passes_the_contract(isolated_registry):
    from soe_toy_audio import ToyAudioExpert

    failed = [str(r) for r in check_expert(ToyAudioExpert) if not r.passed]
    assert not failed, failed


@pytest.mark.slow
def test_example_plugin_installs_and_is_discovered_through_entry_points(tmp_path):
    """pip-install the package (offline, no deps) into a private --target dir: the shared venv is untouched."""
    src, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), str(src)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / "soe_toy_audio").is_dir() and list(target.glob("soe_toy_audio-*.dist-info"))

    script = (
        "import sys; from importlib.metadata import entry_points\n"
        "assert 'soe_toy_audio' not in sys.modules\n"
        "assert 'toy-audio-dit' in [ep.name for ep in entry_points(group='soe.experts')]\n"
        "import soe; cls = soe.get_expert('toy-audio-dit')\n"
        f"assert cls.__module__ == 'soe_toy_audio.expert' and sys.modules['soe_toy_audio'].__file__.startswith({str(target)!r})\n"
        "from soe.cli import main; sys.exit(main(['experts', 'check', 'toy-audio-dit']))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]), COLUMNS="200", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "10/10 properties hold" in proc.stdout


# ---- one-way stitching into a model with no plugin -----------------------------------------------
F, H, W = 4, 4, 4  # latent grid of the LTX-Video host (patch size 1: one token per latent pixel)


def ltx_host(seed=0):
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                                      cross_attention_dim=32, num_layers=3, caption_channels=16).eval()


def ltx_batch(seed=0, batch_size=2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch_size, F * H * W, 8, generator=g),
                encoder_hidden_states=torch.randn(batch_size, 5, 16, generator=g), timestep=torch.rand(batch_size, generator=g) * 1000,
                encoder_attention_mask=torch.ones(batch_size, 5), num_frames=F, height=H, width=W, return_dict=False)


def ltx_layout(batch):  # LTX-Video latents: 8x temporal compression of 25 fps video
    return TokenLayout((batch["num_frames"], batch["height"], batch["width"]), ("t", "h", "w"), 25 / 8)


@pytest.mark.parametrize("source_name", ["ace-step-1.5", "stable-audio-open", "wan2.2-ti2v"])
def test_stitch_into_a_model_without_plugin(source_name):
    host, source = ltx_host(), tiny(source_name)
    keys = list(host.state_dict())
    hb, sb = ltx_batch(), source.dummy_batch(2, 1.3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = host(**hb)[0]
        st = stitch_into(host, source, layout_fn=ltx_layout)  # blocks="auto"
        assert st.b.blocks_path == "transformer_blocks" and st.engine == "hooks" and st.b.hidden_size == 32
        ps, ph = st(sb, hb)
        assert torch.equal(ph, ref) and torch.equal(ps, source(sb))  # zero-init: both exactly native

    # a training step: host and source frozen, connectors train and then change the host only
    st.requires_grad_(False)
    st.connectors.requires_grad_(True)
    _, ph = st(sb, hb)
    (ph - torch.randn_like(ph)).square().mean().backward()
    assert {n for n, p in st.named_parameters() if p.grad is not None} == {n for n, _ in st.named_parameters() if n.startswith("connectors.")}
    torch.optim.SGD(st.connectors.parameters(), lr=1.0).step()
    with torch.no_grad():
        assert not torch.allclose(st(sb, hb)[1], ref)
        st.unstitch()
        assert torch.equal(host(**hb)[0], ref) and list(host.state_dict()) == keys


def test_plugin_less_model_as_the_source():
    host_expert, source = tiny("ace-step-1.5"), BlockListExpert(ltx_host(), ltx_layout, blocks="transformer_blocks")
    st = Stitcher(source, host_expert, direction="a_to_b", connector=ConnectorConfig(init="trunc_normal"))
    hb = host_expert.dummy_batch(2, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ps, ph = st(ltx_batch(), hb)
    assert torch.equal(ps, source(ltx_batch())) and not torch.allclose(ph, host_expert(hb))


def test_plugin_less_model_cannot_stitch_two_way():
    st = Stitcher(tiny("ace-step-1.5"), BlockListExpert(ltx_host(), ltx_layout), direction="both")
    with pytest.raises(NotImplementedError, match="one-way"):
        st(tiny("ace-step-1.5").dummy_batch(2), ltx_batch())


class TwoStacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.double_blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.single_blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.head = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])  # mixed types: not a block list


def test_auto_block_list_is_ambiguous_with_two_similar_stacks():
    with pytest.raises(BlockListError) as info:
        find_block_list(TwoStacks())
    msg = str(info.value)
    assert "'double_blocks' (4 x Linear, 288 parameters)" in msg and "'single_blocks' (3 x Linear" in msg and "head" not in msg
    assert find_block_list(TwoStacks(), "single_blocks")[0] == "single_blocks"


def test_block_list_errors_list_the_candidates():
    with pytest.raises(BlockListError, match="no submodule 'layers'.*'double_blocks'"):
        find_block_list(TwoStacks(), "layers")
    with pytest.raises(BlockListError, match="not a non-empty nn.ModuleList"):
        find_block_list(TwoStacks(), "double_blocks.0")
    with pytest.raises(BlockListError, match="no nn.ModuleList of repeated blocks"):
        find_block_list(nn.Sequential(nn.Linear(2, 2)))
