"""Context parallel (parallel.context=2): the video expert's tokens split across two gloo ranks give what one
process gives — a stitched forward and backward, a 4-step sample with CFG, three training steps — for the tiny
recipe's two-way stitch (lockstep), both one-way hook-engine stitches, ``pool: moments`` and the UniVerse-1 fusion
(inserted blocks, taps, attention k/v injection into a split self-attention through diffusers' Ulysses).

One worker run (tests/context_parallel_worker.py, ~30 s) computes every case on both ranks and in one process."""
import itertools
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "out.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, str(HERE / "context_parallel_worker.py"), str(port), str(out)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def assert_close(got, want, tol):
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            assert_close(got[k], want[k], tol)
    elif isinstance(want, (tuple, list)):
        for g, w in zip(got, want):
            assert_close(g, w, tol)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["lockstep", "moments", "hooks_a_to_b", "hooks_b_to_a", "universe1", "universe1_checkpointed"])
def test_forward_and_every_trainable_gradient_equal_one_process(runs, kind):
    r = runs[f"{kind}.forward_backward"]
    assert r["side"] == "a"  # the video expert (more tokens per second) is the one split
    assert len(r["want"]["grads"]) > 50 and any(n.startswith("connectors.") for n in r["want"]["grads"])
    assert any(g.abs().max() > 0 for n, g in r["want"]["grads"].items() if n.startswith("connectors."))
    assert_close(r["got"], r["want"], 1e-5)


@pytest.mark.parametrize("kind", ["lockstep", "universe1"])
def test_a_four_step_sample_with_guidance_equals_one_process(runs, kind):
    r = runs[f"{kind}.sample"]
    assert set(r["want"]) == {"a", "b"} and all(torch.isfinite(x).all() for x in r["want"].values())
    assert_close(r["got"], r["want"], 1e-5)


@pytest.mark.parametrize("kind", ["lockstep", "universe1"])
def test_three_training_steps_equal_one_process(runs, kind):
    r = runs[f"{kind}.train"]
    assert r["want"]["losses"].shape == (3, 2)
    assert_close(r["got"], r["want"], 1e-4)


def test_a_sequence_that_does_not_split_evenly_is_refused_in_one_line(runs):
    msg = runs["uneven"]
    assert msg.startswith("UsageError: parallel.context=2: expert a has 15 tokens") and "\n" not in msg


TINY = HERE / "recipes" / "tiny.yaml"
RANKS = [("trainer.devices=4", "trainer.strategy=ddp", "parallel.context=2"),  # a 4-rank run beside a 2-rank one
         ("trainer.devices=2", "trainer.strategy=ddp", "parallel.context=2"), ("trainer.devices=2", "trainer.strategy=fsdp2", "parallel.context=2"),
         ("trainer.devices=2", "trainer.strategy=ddp"), ("trainer.devices=4", "trainer.strategy=fsdp2", "parallel.context=2"),
         ("trainer.devices=2", "trainer.strategy=fsdp2")]


@pytest.fixture(scope="module")
def stitch_runs(tiny_stitch):
    """The runs of soe stitch below, started two at a time in the background (tiny_stitch, tests/conftest.py)."""
    for overrides in RANKS:
        tiny_stitch.start(*overrides)
    return tiny_stitch


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_soe_stitch_with_two_ranks_sharing_each_sample_trains_as_one_process(stitch_runs, strategy):
    """`soe stitch trainer.devices=2 parallel.context=2`: the same batches, noise and timesteps on both ranks of the
    sample, gradients scaled and averaged: three AdamW steps log the losses and write the trained tensors of one process.
    (tiny_stitch, tests/conftest.py: each run once per session; the one-process run is shared by both strategies.)"""
    same_run(stitch_runs(), stitch_runs("trainer.devices=2", f"trainer.strategy={strategy}", "parallel.context=2"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_data_parallel_groups_of_two_context_ranks_train_as_two_data_parallel_ranks(stitch_runs, strategy):
    """4 ranks = 2 data-parallel groups x 2 context ranks (mesh (dp, cfg, ring, ulysses) = (2, 1, 1, 2), laid out as
    Lightning's (data_parallel, tensor_parallel)) give what 2 plain data-parallel ranks give; fsdp2 shards over dp.
    (The 2-rank runs are the ones tests/test_training.py checks.)"""
    same_run(stitch_runs("trainer.devices=2", f"trainer.strategy={strategy}"),
             stitch_runs("trainer.devices=4", f"trainer.strategy={strategy}", "parallel.context=2"))


def same_run(one, two):
    """The logged losses and the trained tensors of two run folders agree within 1e-4."""
    from safetensors.torch import load_file

    rows = [(r / "logs" / "version_0" / "metrics.csv").read_text().splitlines() for r in (one, two)]
    assert len(rows[0]) == 4
    for a, b in zip(*rows):
        if a[0].isdigit():
            torch.testing.assert_close(torch.tensor([float(x) for x in b.split(",")]), torch.tensor([float(x) for x in a.split(",")]),
                                       rtol=0, atol=1e-4)
    files = sorted((one / "trained").rglob("*.safetensors"))
    assert len(files) == 3  # connectors, both LoRA adapters
    for f in files:
        want, got = load_file(f), load_file(two / f.relative_to(one))
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4)


GEN = ["sample.steps=4", "sample.seconds=1.0", "sample.guidance.a=2.0", "sample.guidance.b=3.0", "trainer.threads=1",
       "stitch.connector.init=trunc_normal"]


@pytest.fixture(scope="module")
def one_process_sample(tmp_path_factory):
    """`soe generate` of one process (in this process: no ranks, no start-up), once for the three cases below."""
    from soe.cli import main

    out = tmp_path_factory.mktemp("generate") / "one"
    threads = torch.get_num_threads()
    try:
        assert main(["generate", str(TINY), *GEN, f"out={out}"]) == 0
    finally:
        torch.set_num_threads(threads)  # trainer.threads=1 set it for this process
    return out


TORCHRUN = [(2, ("parallel.context=2",)), (2, ("parallel.cfg=true",)), (4, ("parallel.context=2", "parallel.cfg=true"))]


@pytest.fixture(scope="module")
def torchrun_samples(tmp_path_factory):
    """The torchrun runs of soe generate below, started together, two at a time (in_background, tests/conftest.py):
    a run's agent starts alone and rank 0 alone writes the mp4, leaving a core idle. Each on a port of its own."""
    from conftest import LAUNCH_ENV, in_background

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    limit, runs = threading.Semaphore(2), {}
    for nproc, extra in TORCHRUN:
        out = tmp_path_factory.mktemp("torchrun") / "many"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={port}",
               "-m", "soe", "generate", str(TINY), *GEN, f"out={out}", *extra]
        runs[nproc, extra] = (out, in_background(cmd, out.parent, env, limit))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("nproc,extra", TORCHRUN)
def test_soe_generate_under_torchrun_samples_what_one_process_samples(torchrun_samples, one_process_sample, nproc, extra):
    from safetensors.torch import load_file

    out, run = torchrun_samples[nproc, extra]
    proc = run.result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 2  # rank 0 alone prints (the mp4 and the contact sheet) and writes
    assert sorted(p.name for p in out.iterdir()) == ["latents.safetensors", "sample_00.mp4", "sample_00.png"]
    want, got = load_file(one_process_sample / "latents.safetensors"), load_file(out / "latents.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


# ---- the recipe section and its one-line refusals ----------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["inspect", str(TINY), "parallel.context=0"], "parallel.context: expected a positive integer"),
    (["inspect", str(TINY), "parallel.context=true"], "parallel.context"),
    (["stitch", str(TINY), "parallel.cfg=true"], "parallel.cfg: runs the two branches of classifier-free guidance"),
    (["stitch", str(TINY), "trainer.devices=3", "trainer.strategy=ddp", "parallel.context=2"],
     "parallel.context: context 2 = 2 ranks per sample does not divide the 3 ranks of trainer.devices x trainer.num_nodes"),
    (["stitch", str(TINY), "trainer.devices=2", "trainer.strategy=auto", "parallel.context=2"],
     "parallel.context: runs under trainer.strategy ddp or fsdp2, not 'auto'"),
    (["generate", str(TINY), "parallel.context=2"], ("parallel: one sample takes parallel.context x (2 if parallel.cfg) = 2 ranks; "
                                                    "run `torchrun --nproc-per-node 2 -m soe generate ...` (WORLD_SIZE is 1)")),
])
def test_bad_parallel_settings_are_one_line_and_write_nothing(argv, message, tmp_path, capsys, monkeypatch):
    from soe.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    where = {"stitch": [f"run_dir={tmp_path / 'run'}"], "generate": [f"out={tmp_path / 'out'}"]}.get(argv[0], [])
    assert main([*argv, *where]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cfg_parallel_needs_guidance_and_generate_needs_the_group_it_was_started_with(monkeypatch):
    from soe.recipe.reading import load_recipe
    from soe.sample.parallel import check_ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="sample.guidance is 1 for both experts"):
        check_ranks(load_recipe(str(TINY), ["parallel.cfg=true"]))
    with pytest.raises(Exception, match=r"= 4 ranks; run `torchrun --nproc-per-node 4"):
        check_ranks(load_recipe(str(TINY), ["parallel.cfg=true", "parallel.context=2", "sample.guidance.a=2.0"]))
    with pytest.raises(Exception, match="set parallel.context or parallel.cfg"):
        check_ranks(load_recipe(str(TINY), []))
    assert check_ranks(load_recipe(str(TINY), ["parallel.cfg=true", "sample.guidance.b=3.0"])).group == 2


def test_the_data_parallel_size_is_the_world_over_the_ranks_of_a_sample():
    from soe.schema import ParallelConfig, RecipeError

    assert ParallelConfig(context=2, cfg=True).data_parallel(8) == 2
    assert ParallelConfig(context=4).data_parallel(8) == 2 and ParallelConfig().data_parallel(3) == 3
    with pytest.raises(RecipeError, match="context 2 x cfg 2 = 4 ranks per sample does not divide the 6 ranks"):
        ParallelConfig(context=2, cfg=True).data_parallel(6)


# ---- what the stitch adds, without ranks -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["mean", "moments"])
@pytest.mark.parametrize("grid", [(5, 3, 4), (7,)])
def test_partial_pools_of_any_split_add_up_to_the_pool_of_the_whole(mode, grid):
    """Parts that cut through time steps (3 of them, uneven): their contributions sum to pool_steps of the whole."""
    from soe.plugin.expert import TokenLayout
    from soe.stitch.align import broadcast_to_grid, partial_pool_steps, pool_steps

    layout = TokenLayout(grid, ("t", "h", "w")[: len(grid)], 6.25)
    h = torch.randn(2, layout.num_tokens, 8, dtype=torch.float64)
    cuts = [0, layout.num_tokens // 3 + 1, 2 * layout.num_tokens // 3, layout.num_tokens]
    parts = sum(partial_pool_steps(h[:, a:b], layout, a, mode) for a, b in itertools.pairwise(cuts))
    torch.testing.assert_close(parts, pool_steps(h, layout, mode))
    steps = torch.randn(2, layout.num_steps, 8)
    whole = broadcast_to_grid(steps, layout)
    for a, b in itertools.pairwise(cuts):
        assert torch.equal(broadcast_to_grid(steps, layout, a, b), whole[:, a:b])
