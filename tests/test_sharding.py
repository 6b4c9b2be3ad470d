"""FSDP2 with experts built on the meta device and loaded shard by shard (soe/train/sharding.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from soe.errors import CheckpointError
from soe.plugin.registry import get_expert
from soe.plugin.weights import FolderWeights, load_weights, weight_files
from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.train.build import apply_training_setup, build_stitcher_to_shard
from soe.train.sharding import file_key, load_inserted_shards, load_shards

ROOT = Path(__file__).parents[1]
KV_B_TO_A = "{b_to_a: {mode: attention_kv, targets: [{attention: attn2}]}}"  # into Wan's cross-attention (it has norm_k)
KV_BOTH = ("{b_to_a: {mode: attention_kv, targets: [{attention: attn2}]}, "
           "a_to_b: {mode: attention_kv, targets: [{attention: cross_attn}]}}")  # and into ACE-Step's, inserted blocks too
KV_A_TO_B = "{a_to_b: {mode: attention_kv, targets: [{attention: cross_attn}]}}"  # one way: the stitch can run
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Wan2.1 and ACE-Step v1 experts written in their official layouts."""
    out = tmp_path_factory.mktemp("experts")
    get_expert("wan2.1").tiny(seed=1).save(out / "wan")
    get_expert("ace-step").tiny(seed=2, sample_rate=25600).save(out / "ace")
    return out


def recipe(saved, *overrides):
    return load_recipe(TINY, [f"experts.a.path={saved / 'wan'}", "experts.b.name=ace-step", f"experts.b.path={saved / 'ace'}",
                              "experts.b.options={sample_rate: 25600}", *overrides])


def test_experts_from_files_connectors_and_lora_are_built_on_meta_with_real_buffers(saved):
    cfg = recipe(saved)
    stitcher, plan = build_stitcher_to_shard(cfg)
    weights = plan.weights
    assert set(weights) == {"a", "b"} and plan.rng_state is not None
    apply_training_setup(stitcher, cfg, plan=plan)
    assert set(plan.lora) == {"a", "b"}
    for side in ("a", "b"):
        expert = getattr(stitcher, side)
        assert all(p.is_meta for p in expert.parameters())  # LoRA adapters included
        assert any("lora_A" in n for n, _ in expert.named_parameters())
        assert not any(b.is_meta for b in expert.buffers())  # rotary tables etc. are computed, not loaded
        assert all(file_key(n) in weights[side] for n, _ in expert.model.named_parameters() if "lora_" not in n)
    assert all(p.is_meta and p.requires_grad for p in stitcher.connectors.parameters())
    # what run.py builds before the Trainer exists works on the meta experts: the same synthetic clips
    from soe.data.datamodule import SyntheticAVDataModule

    eager = build_stitcher(recipe(saved))
    clips = [SyntheticAVDataModule({"a": st.a, "b": st.b}, seconds=1.0, num_clips=1).make_clip(0) for st in (stitcher, eager)]
    for side in ("a", "b"):
        assert clips[0][side].keys() == clips[1][side].keys()
        for k in clips[0][side]:
            assert torch.equal(clips[0][side][k], clips[1][side][k]), (side, k)
    # k/v injection into a preset expert copies its random weights: such stitches are built whole
    whole, none = build_stitcher_to_shard(recipe(saved, f"stitch.inject={KV_B_TO_A}", "experts.a.path=null"))
    assert not none and not any(p.is_meta for p in whole.parameters())


@pytest.mark.parametrize("name", ["wan2.1", "ace-step", "ace-step-1.5"])
def test_load_empty_leaves_the_global_rng_where_load_leaves_it(name, saved, tmp_path):
    """The connectors and adapters that FSDP2 draws after the experts start from this state."""
    folder, opts = {"wan2.1": (saved / "wan", {}), "ace-step": (saved / "ace", {"sample_rate": 25600})}.get(name, (tmp_path / "e", {}))
    if not folder.exists():
        get_expert(name).tiny(seed=3).save(folder)
    states = []
    for load in (get_expert(name).load, get_expert(name).load_empty):
        torch.manual_seed(7)
        load(folder, **opts)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


def test_connectors_and_lora_drawn_after_the_build_equal_the_eager_build(saved):
    """Without a mesh: the meta connectors and adapters, drawn from the recorded RNG state, hold
    what an eager build (same seed) holds, bit for bit; a preset expert on the other side too."""
    for cfg in (recipe(saved, "stitch.connector.init=trunc_normal"),
                recipe(saved, "experts.b.path=null", "experts.b.preset=tiny", "stitch.direction=b_to_a")):
        torch.manual_seed(5)
        lazy, plan = build_stitcher_to_shard(cfg)
        apply_training_setup(lazy, cfg, plan=plan)
        from soe.lora.adapters import materialise_adapters
        from soe.train.sharding import draw_connectors

        outside = torch.get_rng_state()
        torch.set_rng_state(plan.rng_state)
        assert draw_connectors(lazy) == len(lazy.connectors[next(iter(lazy.connectors))]) * len(lazy.connectors)
        for side, spec in plan.lora.items():
            assert materialise_adapters(getattr(lazy, side), spec, "cpu") > 0
        torch.set_rng_state(outside)
        torch.manual_seed(5)
        eager = build_stitcher(cfg)
        apply_training_setup(eager, cfg)
        want = {n: p for n, p in eager.named_parameters() if not n.startswith(("a.", "b.")) or "lora_" in n}
        got = dict(lazy.named_parameters())
        assert any("lora_A" in n for n in want) and any(n.startswith("connectors.") for n in want)
        for n, w in want.items():
            assert not got[n].is_meta and got[n].requires_grad == w.requires_grad, n
            assert got[n].dtype == w.dtype and torch.equal(got[n], w), n


def test_load_shards_without_a_mesh_equals_the_eager_load_and_names_a_missing_tensor(saved, tmp_path):
    cfg = recipe(saved, "stitch.depth.mode=insert_interpolated")  # ace-step's 2 blocks + 2 inserted ones
    eager = build_stitcher(cfg)
    lazy, plan = build_stitcher_to_shard(cfg)
    weights = plan.weights
    assert len(lazy.fusion.inserted["b"]) == 2 and all(p.is_meta for p in lazy.fusion.parameters())
    for side in ("a", "b"):
        assert load_shards(getattr(lazy, side), weights[side], side) > 0
        want = getattr(eager, side).model.state_dict()
        got = getattr(lazy, side).model.state_dict()
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert load_inserted_shards(lazy, "b", weights["b"]) > 0 and load_inserted_shards(lazy, "a", weights["a"]) == 0
    want, got = eager.fusion.state_dict(), lazy.fusion.state_dict()
    assert set(got) == set(want) and len(want) > 0
    for k in want:  # the mean of the neighbouring blocks, as the eager build computes it
        assert torch.equal(got[k], want[k]), k
    # a file that lacks a tensor the model has: one line naming the key and the folder
    from safetensors.torch import save_file

    state = load_weights(saved / "wan" / "transformer")
    state.pop("proj_out.weight")
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(state, broken / weight_files(saved / "wan" / "transformer")[0].name)
    (broken / "config.json").write_text((saved / "wan" / "transformer" / "config.json").read_text())
    expert, _ = get_expert("wan2.1").load_empty(broken)
    with pytest.raises(CheckpointError, match=r"experts\.a\.path: '.*broken' has no tensor 'proj_out\.weight'"):
        load_shards(expert, FolderWeights(broken), "a")


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import lightning as L
    from torch.distributed.device_mesh import init_device_mesh
    from soe.recipe.builders import build_stitcher
    from soe.train.build import build_stitcher_to_shard
    from soe.recipe.reading import load_recipe
    from soe.train.build import apply_training_setup
    from soe.schema import OptimConfig
    from soe.train.module import StitchModule
    from soe.train.build import build_objective

    def main(rank, overrides, out):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2)
        for n, extra in enumerate([[], ["stitch.depth.mode=insert_interpolated", "stitch.inject=" + sys.argv[-1]]]):
            compare(rank, load_recipe(overrides[0], overrides[1:] + extra), f"{out}.{n}")
        dist.destroy_process_group()

    def compare(rank, cfg, out):
        L.seed_everything(0, verbose=False)
        stitcher, plan = build_stitcher_to_shard(cfg)
        apply_training_setup(stitcher, cfg, plan=plan)
        all_meta = all(p.is_meta for p in stitcher.parameters())  # experts, connectors and LoRA: nothing whole yet
        module = StitchModule(stitcher, build_objective(cfg, stitcher), OptimConfig(), plan=plan)
        module._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        full = {n: p.full_tensor() for n, p in stitcher.named_parameters()}
        grad = {n for n, p in stitcher.named_parameters() if p.requires_grad}
        local = sum(p.to_local().numel() for p in stitcher.parameters())
        glob = sum(p.numel() for p in stitcher.parameters())
        L.seed_everything(0, verbose=False)
        ref = build_stitcher(cfg)  # eager: every expert, connector and adapter whole, drawn from the same seed
        apply_training_setup(ref, cfg)
        batch = {s: getattr(ref, s).dummy_batch(2, 1.0, torch.Generator().manual_seed(3)) for s in ("a", "b")}
        with torch.no_grad():
            got = stitcher(batch["a"], batch["b"])
            want = ref(batch["a"], batch["b"])
        if rank == 0:
            torch.save(dict(all_meta=all_meta, full=full, grad=grad, local=local, glob=glob,
                            ref={n: p.detach() for n, p in ref.named_parameters()},
                            ref_grad={n for n, p in ref.named_parameters() if p.requires_grad},
                            got=got, want=want), out)

    if __name__ == "__main__":
        import torch.multiprocessing as mp
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        mp.spawn(main, args=(sys.argv[3:-1], sys.argv[2]), nprocs=2)
""")


@pytest.mark.slow
def test_two_gloo_ranks_hold_half_and_compute_what_the_eager_stitch_computes(saved, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg = [str(TINY), f"experts.a.path={saved / 'wan'}", "experts.b.name=ace-step", f"experts.b.path={saved / 'ace'}",
           "experts.b.options={sample_rate: 25600}", "stitch.connector.init=trunc_normal"]
    proc = subprocess.run([sys.executable, str(script), str(port), str(tmp_path / "out.pt"), *cfg, KV_A_TO_B],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in range(2):  # as built, and with depth expansion's inserted blocks and k/v injection
        check_gathered(torch.load(tmp_path / f"out.pt.{n}", weights_only=False), inserted=n == 1)


def check_gathered(r, inserted):
    assert r["all_meta"]  # before sharding no rank holds an expert, connector or adapter whole
    assert set(r["full"]) == set(r["ref"]) and r["grad"] == r["ref_grad"]
    assert any("lora_A" in n for n in r["ref"]) and any(n.startswith("connectors.") for n in r["ref"])
    assert any(n.startswith("fusion.inserted.b.") for n in r["ref"]) == inserted
    assert any(n.startswith("fusion.kv.a_to_b.") for n in r["ref"]) == inserted
    for name, p in r["ref"].items():
        # expert tensors as the files hold them; connectors and LoRA as the eager build drew them
        assert r["full"][name].dtype == p.dtype and torch.equal(r["full"][name], p), name
    assert r["local"] / r["glob"] < 0.53  # rank 0 holds its half (the first rank takes the odd rows)
    for g, w in zip(r["got"], r["want"]):
        torch.testing.assert_close(g, w)  # the same function as the eager stitch (connector outputs drawn, not zero)


def test_k_v_injection_and_inserted_blocks_filled_from_the_files_equal_the_eager_build(saved):
    """Without a mesh: new k/v projections (drawn after the connectors, copied weights and key norms read
    from the files, an inserted block's as its neighbours' mean) and everything else equal the eager build."""
    from soe.lora.adapters import materialise_adapters
    from soe.train.sharding import draw_connectors, draw_kv

    cfg = recipe(saved, "stitch.depth.mode=insert_interpolated", f"stitch.inject={KV_BOTH}", "stitch.connector.init=trunc_normal")
    torch.manual_seed(5)
    lazy, plan = build_stitcher_to_shard(cfg)
    apply_training_setup(lazy, cfg, plan=plan)
    assert plan and all(p.is_meta for p in lazy.parameters())
    torch.set_rng_state(plan.rng_state)
    draw_connectors(lazy)
    assert draw_kv(lazy, plan.weights) == len(lazy.fusion.kv["a_to_b"]) + len(lazy.fusion.kv["b_to_a"])
    for side, spec in plan.lora.items():
        materialise_adapters(getattr(lazy, side), spec, "cpu")
    for side in ("a", "b"):
        load_shards(getattr(lazy, side), plan.weights[side], side)
        load_inserted_shards(lazy, side, plan.weights[side])
    torch.manual_seed(5)
    eager = build_stitcher(cfg)
    apply_training_setup(eager, cfg)
    want, got = dict(eager.named_parameters()), dict(lazy.named_parameters())
    assert set(got) == set(want)
    assert any(".norm_k." in n for n in want if n.startswith("fusion.kv.b_to_a"))
    assert set(lazy.fusion.kv["a_to_b"]) & set(lazy.fusion.inserted["b"])  # k/v copied from an inserted block
    for n, w in want.items():
        assert got[n].dtype == w.dtype and got[n].requires_grad == w.requires_grad and torch.equal(got[n], w), n
