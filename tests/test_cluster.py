"""Cluster runs (docs/cluster.md): the strategies soe offers, which process owns the run folder under
each launcher, two "nodes" of one process each that train and resume exactly, and the sbatch template.
"""
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soe.cli import main
from soe.train.checkpoint import read_checkpoint
from soe.train.plots import read_run_metrics

ROOT = Path(__file__).parents[1]
RECIPE = """\
name: cluster-test
seed: 5
experts:
  a: {name: wan2.1, preset: tiny, train: lora, lora: {r: 2, alpha: 2, dropout: 0.1}}
  b: {name: ace-step-1.5, preset: tiny, train: lora, lora: {r: 2, alpha: 2}}
stitch: {pairs: linear, direction: both, connector: {init: trunc_normal}}
flow: {balance: ema}
data: {kind: synthetic, seconds: 1.0, batch_size: 1, num_clips: 6}
optim: {lr: 1.0e-2, warmup_steps: 2}
trainer: {max_steps: 4, accelerator: cpu, log_every_n_steps: 1, checkpoint_every_n_steps: 100, threads: 1}
"""
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
                 "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME",
                 "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "LSB_JOBID", "JSM_NAMESPACE_RANK")


# ---- trainer.strategy: each value soe offers is tested on 2 CPU ranks; the rest are refused in one line --------------
@pytest.mark.parametrize("name, instead", [("fsdp", "fsdp2"), ("deepspeed_stage_2", "fsdp2"), ("deepspeed_stage_3_offload", "fsdp2"),
                                           ("ddp_spawn", "ddp")])
def test_untested_lightning_strategies_are_refused_in_one_line(tmp_path, capsys, name, instead):
    run = tmp_path / "run"
    assert main(["stitch", str(ROOT / "tests" / "recipes" / "tiny.yaml"), f"run_dir={run}", f"trainer.strategy={name}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: trainer.strategy: '{name}' is not offered: ") and err.count("error:") == 1, err
    assert f"use '{instead}' (one of ['auto', 'ddp', 'fsdp2'])" in err, err
    assert not run.exists()  # nothing written


def _assert_same_checkpoints(straight_dir, resumed_dir, steps):
    """The trainable tensors of two runs' ``last.ckpt`` bit-equal, and every logged loss."""
    a = read_checkpoint(straight_dir / "checkpoints" / "last.ckpt", mmap=False)
    b = read_checkpoint(resumed_dir / "checkpoints" / "last.ckpt", mmap=False)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys() and any("lora_A" in k for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert type(v) is torch.Tensor and torch.equal(v, b["state_dict"][k]), k  # whole tensors, not a rank's shard
    la, lb = read_run_metrics(straight_dir), read_run_metrics(resumed_dir)
    assert [s for s, _ in la["loss"]] == list(range(steps)) and la["loss"] == lb["loss"]


@pytest.mark.slow
def test_fsdp2_checkpoint_is_one_file_of_whole_tensors_and_two_ranks_resume_from_it(tmp_path):
    """fsdp2 on 2 gloo ranks: ``last.ckpt`` is one file of whole trainable tensors (gathered on rank 0, the
    shapes of a one-process run), and a resume continues from it. (Bit-equality with an uninterrupted run is not
    asserted: two identical fsdp2 runs on CPU already differ in the last bits; the restore itself is exact, next test.)"""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    def start(steps, *extra):
        return subprocess.Popen([sys.executable, "-m", "soe.cli", "stitch", str(recipe), f"run_dir={tmp_path / 'run'}", "trainer.devices=2",
                                 "trainer.strategy=fsdp2", "trainer.accelerator=cpu", f"trainer.max_steps={steps}", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    def run(steps, *extra, proc=None):
        proc = proc or start(steps, *extra)
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, out[-2000:] + err[-3000:]

    first = start(2)
    try:
        whole = {k: v.shape for k, v in train_one_step(tmp_path).items()}  # one process, no sharding; meanwhile the ranks start
    finally:
        run(2, proc=first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = read_checkpoint(last, mmap=False)
    assert {k: v.shape for k, v in saved["state_dict"].items()} == whole
    assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())
    run(3, "resume=true")
    assert read_checkpoint(last)["global_step"] == 3
    assert [s for s, _ in read_run_metrics(tmp_path / "run")["loss"]] == [0, 1, 2]


def train_one_step(tmp_path) -> dict:
    from soe.cli.stitch import run_training

    (tmp_path / "one.yaml").write_text(RECIPE)
    return run_training(tmp_path / "one.yaml", [f"run_dir={tmp_path / 'one'}", "trainer.max_steps=1"], progress=False,
                        console=_quiet())["module"].trainable_state_dict()


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (an fsdp2 shard) as the whole tensor


def _quiet():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def test_fsdp2_resume_restores_weights_and_optimizer_state_exactly(tmp_path, monkeypatch):
    """fsdp2 (one gloo rank, in this process): when the resumed run's first step starts, every trainable tensor,
    Adam moment and step, and the LR schedule equal what the checkpoint file holds, bit for bit."""
    from soe.cli.stitch import run_training
    from soe.train.module import StitchModule

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    args = [f"run_dir={tmp_path / 'run'}", "trainer.devices=1", "trainer.strategy=fsdp2", "trainer.accelerator=cpu"]
    run_training(tmp_path / "recipe.yaml", [*args, "trainer.max_steps=2"], console=_quiet(), progress=False)
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", mmap=False)
    seen = {}

    def on_train_start(module):
        params = dict(module.named_parameters())
        seen["params"] = {n: _whole(params[n]).detach().clone() for n in saved["state_dict"] if n in params}
        opt = module.trainer.optimizers[0]
        ids = {id(p): i for i, p in enumerate(module.parameters())}  # the ids Lightning keys a full optimizer state by
        seen["adam"] = {ids[id(p)]: {k: _whole(v).clone() for k, v in opt.state[p].items()}  # the steps change them in place
                        for g in opt.param_groups for p in g["params"]}
        seen["schedule"] = [c.scheduler.state_dict() for c in module.trainer.lr_scheduler_configs]

    monkeypatch.setattr(StitchModule, "on_train_start", on_train_start, raising=False)
    run_training(tmp_path / "recipe.yaml", [*args, "trainer.max_steps=3", "resume=true"], console=_quiet(), progress=False)
    assert seen["params"].keys() == {k for k in saved["state_dict"] if not k.startswith("objective.")} and seen["params"]
    for k, v in seen["params"].items():
        assert torch.equal(v, saved["state_dict"][k]), k
    adam = saved["optimizer_states"][0]["state"]
    assert seen["adam"].keys() == adam.keys()
    bad = {key: sum(not torch.equal(seen["adam"][i][key], state[key]) for i, state in adam.items()) for key in ("exp_avg", "exp_avg_sq", "step")}
    assert bad == {"exp_avg": 0, "exp_avg_sq": 0, "step": 0}, bad
    assert seen["schedule"] == saved["lr_schedulers"]


# ---- which process owns the run folder, before the Trainer exists ---------------------------------------------------
@pytest.mark.parametrize("env, devices, rank", [
    ({}, 1, 0),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "LOCAL_RANK": "1", "GROUP_RANK": "1", "LOCAL_WORLD_SIZE": "4",
      "WORLD_SIZE": "8"}, 4, 5),  # torchrun
    ({"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "train"}, 4, 6),  # srun
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_JOB_NAME": "interactive", "LOCAL_RANK": "0", "NODE_RANK": "1"}, 2, 2),
    ({"LOCAL_RANK": "1", "NODE_RANK": "2", "WORLD_SIZE": "12"}, 4, 9),  # one command per node, started by hand
    ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "2"}, [0], 1),
], ids=["alone", "torchrun", "srun", "slurm-interactive", "by-hand", "by-hand-list"])
def test_process_rank_numbers_processes_as_lightning_will(monkeypatch, env, devices, rank):
    from soe.train.cluster import process_rank

    _launched_by(monkeypatch, env)
    assert process_rank(devices, 2) == rank


def test_a_launch_lightning_refuses_is_one_line_naming_trainer(monkeypatch):
    from soe.errors import RecipeError
    from soe.train.cluster import process_rank

    _launched_by(monkeypatch, {"SLURM_NTASKS": "8", "SLURM_PROCID": "6", "SLURM_JOB_NAME": "train"})  # --ntasks alone
    with pytest.raises(RecipeError, match=r"^trainer: You set `--ntasks=8` .* Use `--ntasks-per-node=8` instead\.$"):
        process_rank(4, 2)


def _launched_by(monkeypatch, env: dict) -> None:
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


# ---- two "nodes" of one process each on this machine: train, resume, equal an uninterrupted run ----------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, node: int, port: int) -> tuple[list[str], dict]:
    """The command prefix and environment that start node ``node`` of 2 (one process each) the way ``launcher`` does."""
    if launcher == "by-hand":  # Lightning's LightningEnvironment: processes started outside Lightning
        return [sys.executable], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                                  "NODE_RANK": str(node), "LOCAL_RANK": "0"}
    if launcher == "srun":  # what srun sets for `--nodes=2 --ntasks-per-node=1` (SLURMEnvironment)
        return [sys.executable], {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(node),
                                  "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_JOB_NAME": "soe-test",
                                  "SLURM_JOB_ID": "1234", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}
    assert launcher == "torchrun"  # one torchrun agent per node, static rendezvous (TorchElasticEnvironment)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(port)], {}


def _two_nodes(launcher, recipe, run_dir, steps, *extra):
    """``soe stitch`` started once per node (2 nodes of one process each, DDP over gloo) by ``launcher``.
    Returns each node's (stdout, stderr)."""
    return _finish(launcher, _start_two_nodes(launcher, recipe, run_dir, steps, *extra))


def _start_two_nodes(launcher, recipe, run_dir, steps, *extra) -> list[subprocess.Popen]:
    port = _free_port()
    args = ["-m", "soe.cli", "stitch", str(recipe), f"run_dir={run_dir}", "trainer.num_nodes=2", "trainer.devices=1",
            "trainer.strategy=ddp", "trainer.accelerator=cpu", f"trainer.max_steps={steps}", *extra]
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    procs = []
    for node in (0, 1):
        prefix, env = _launch(launcher, node, port)
        procs.append(subprocess.Popen([*prefix, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**base, **env}))
    return procs


def _finish(launcher, procs):
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{launcher}: " + out[-2000:] + err[-3000:]
    return outs


@pytest.mark.slow
def test_two_nodes_own_one_run_folder_and_resume_exactly_under_each_launcher(tmp_path):
    """Two "nodes" of one process each on this machine: started by srun, stopped, resumed by hand-set variables
    (MASTER_ADDR 127.0.0.1, NODE_RANK 0/1), and equal bit for bit to an uninterrupted run under torchrun: the
    three launchers number the processes alike, and node 0 alone writes and reports."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    split, straight = tmp_path / "split", tmp_path / "straight"
    uninterrupted = _start_two_nodes("torchrun", recipe, straight, 4)  # beside the split run: they share no files
    try:
        first = _two_nodes("srun", recipe, split, 2)
        resumed = _two_nodes("by-hand", recipe, split, 4, "resume=true")
    finally:
        _finish("torchrun", uninterrupted)
    for (out0, _), (out1, _) in (first, resumed):  # node 0 alone reports, and writes one logs/version_N per start
        assert "done" in out0 and "block pairs" in out0, out0[-2000:]
        assert "done" not in out1 and "block pairs" not in out1, out1[-2000:]
    assert sorted(p.name for p in (split / "logs").iterdir()) == ["version_0", "version_1"]
    _assert_same_checkpoints(straight, split, 4)


# ---- the sbatch template --------------------------------------------------------------------------------------------
SBATCH = ROOT / "recipes" / "slurm" / "universe1.sbatch"


def _sbatch_options(text: str) -> dict:
    opts = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            opts[m.group(1)] = m.group(2)
    return opts


def _soe_command(text: str, env: dict) -> list[str]:
    """The ``srun ... soe stitch ...`` command of the script (continuation lines joined), its variables expanded."""
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next(ln for ln in joined.splitlines() if ln.strip().startswith("srun "))
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], line)
    words = shlex.split(expanded)
    return words[words.index("soe") + 1:]


def test_sbatch_template_is_a_valid_run_of_the_recipe_it_names():
    """The template's numbers agree (tasks per node = GPUs per node = trainer.devices, nodes = trainer.num_nodes), it
    warns before the time limit with the requeue signal, resumes when a checkpoint exists, and its soe command is a
    valid recipe invocation (the schema and soe's checks, without the weights)."""
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe
    from soe.schema import TrainerConfig, build

    text = SBATCH.read_text()
    opts = _sbatch_options(text)
    assert "requeue" in opts and re.fullmatch(r"USR1@\d+", opts["signal"]), opts  # the signal reaches every srun task
    assert 'RESUME=true' in text and "checkpoints/last.ckpt" in text
    for resume in ("false", "true"):
        argv = _soe_command(text, {"SLURM_JOB_NUM_NODES": opts["nodes"], "GPUS_PER_NODE": opts["ntasks-per-node"],
                                   "RUN_DIR": "/shared/runs/u1", "RESUME": resume, "SLURM_JOB_ID": "1"})
        assert argv[0] == "stitch"
        cfg = load_recipe(ROOT / "recipes" / Path(argv[1]).name, argv[2:])
        validate_recipe(cfg, check_paths=False)
        t = build(TrainerConfig, cfg.trainer, "trainer")
        assert (t.num_nodes, t.devices, t.strategy) == (int(opts["nodes"]), int(opts["ntasks-per-node"]), "fsdp2")
        assert opts["gpus-per-node"] == opts["ntasks-per-node"] and cfg.resume == (resume == "true")
        assert cfg.run_dir == "/shared/runs/u1"
