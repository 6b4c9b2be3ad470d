"""FSDP2 with experts built on the meta device and loaded shard by shard (soe/train/sharding.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from soe.builders import build_stitcher, build_stitcher_to_shard
from soe.config import load_recipe
from soe.errors import CheckpointError
from soe.registry import get_expert
from soe.train.sharding import file_key, load_shards
from soe.weights import FolderWeights, load_weights, weight_files

ROOT = Path(__file__).parents[1]
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


def test_experts_from_files_are_built_on_meta_with_real_buffers_and_connectors(saved):
    stitcher, weights = build_stitcher_to_shard(recipe(saved))
    assert set(weights) == {"a", "b"}
    for side in ("a", "b"):
        expert = getattr(stitcher, side)
        assert all(p.is_meta for p in expert.parameters())
        assert not any(b.is_meta for b in expert.buffers())  # rotary tables etc. are computed, not loaded
        assert all(file_key(n) in weights[side] for n, _ in expert.model.named_parameters())
    assert not any(p.is_meta for p in stitcher.connectors.parameters())
    # what run.py builds before the Trainer exists works on the meta experts: the same synthetic clips
    from soe.data.datamodule import SyntheticAVDataModule

    eager = build_stitcher(recipe(saved))
    clips = [SyntheticAVDataModule({"a": st.a, "b": st.b}, seconds=1.0, num_clips=1).make_clip(0) for st in (stitcher, eager)]
    for side in ("a", "b"):
        assert clips[0][side].keys() == clips[1][side].keys()
        for k in clips[0][side]:
            assert torch.equal(clips[0][side][k], clips[1][side][k]), (side, k)
    # inserted blocks start from the experts' weights: such stitches are built whole
    whole, none = build_stitcher_to_shard(recipe(saved, "stitch.depth.mode=insert_interpolated"))
    assert none == {} and not any(p.is_meta for p in whole.parameters())


def test_load_shards_without_a_mesh_equals_the_eager_load_and_names_a_missing_tensor(saved, tmp_path):
    cfg = recipe(saved)
    eager = build_stitcher(cfg)
    lazy, weights = build_stitcher_to_shard(cfg)
    for side in ("a", "b"):
        assert load_shards(getattr(lazy, side), weights[side], side) > 0
        want = getattr(eager, side).model.state_dict()
        got = getattr(lazy, side).model.state_dict()
        assert set(got) == set(want)
        for k in want:
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
    from soe.builders import build_stitcher, build_stitcher_to_shard
    from soe.config import load_recipe
    from soe.builders import apply_training_setup
    from soe.schema import OptimConfig
    from soe.train.module import StitchModule
    from soe.builders import build_objective

    def main(rank, overrides, out):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2")
        dist.init_process_group("gloo", rank=rank, world_size=2)
        cfg = load_recipe(overrides[0], overrides[1:])
        L.seed_everything(0, verbose=False)
        stitcher, weights = build_stitcher_to_shard(cfg)
        apply_training_setup(stitcher, cfg, adapters_on="cpu")
        real = [p for p in stitcher.parameters() if not p.is_meta]  # LoRA and connectors: the same on every rank
        total = torch.stack([p.double().sum() for p in real]).sum().reshape(1)
        both = [torch.zeros(1, dtype=torch.double) for _ in range(2)]
        dist.all_gather(both, total)
        module = StitchModule(stitcher, build_objective(cfg, stitcher), OptimConfig(), weights=weights)
        module._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
        module.configure_model()
        full = {f"{s}.{n.replace('.base_layer.', '.')}": p.full_tensor() for s in ("a", "b")
                for n, p in getattr(stitcher, s).model.named_parameters() if "lora_" not in n}
        local = sum(p.to_local().numel() for p in stitcher.parameters())
        glob = sum(p.numel() for p in stitcher.parameters())
        ref = build_stitcher(cfg)  # eager: every expert whole
        batch = {s: getattr(ref, s).dummy_batch(2, 1.0, torch.Generator().manual_seed(3)) for s in ("a", "b")}
        with torch.no_grad():
            got = stitcher(batch["a"], batch["b"])
            want = ref(batch["a"], batch["b"])
        if rank == 0:
            torch.save(dict(same_init=bool(both[0] == both[1]), full=full, local=local,
                            glob=glob,
                            ref={f"{s}.{n}": p for s in ("a", "b") for n, p in getattr(ref, s).model.named_parameters()},
                            got=got, want=want), out)
        dist.destroy_process_group()

    if __name__ == "__main__":
        import torch.multiprocessing as mp
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
        mp.spawn(main, args=(sys.argv[3:], sys.argv[2]), nprocs=2)
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
           "experts.b.options={sample_rate: 25600}"]
    proc = subprocess.run([sys.executable, str(script), str(port), str(tmp_path / "out.pt"), *cfg],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = torch.load(tmp_path / "out.pt", weights_only=False)
    assert r["same_init"]  # LoRA and connectors drawn identically on both ranks before sharding
    assert set(r["full"]) == set(r["ref"])
    for name, p in r["ref"].items():
        assert torch.equal(r["full"][name], p.detach()), name  # every expert tensor as the files hold it
    assert r["local"] / r["glob"] < 0.53  # rank 0 holds its half (the first rank takes the odd rows)
    for g, w in zip(r["got"], r["want"]):
        torch.testing.assert_close(g, w)  # zero-init connectors, LoRA B = 0: the stitch equals the experts
