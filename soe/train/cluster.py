"""Runs started by a cluster launcher (SLURM's ``srun``, ``torchrun``, or one command per node with
``MASTER_ADDR`` / ``NODE_RANK`` set by hand): which process is rank 0 before the Trainer exists, and
the SLURM requeue that follows a stop on the requeue signal (docs/cluster.md).

Lightning's cluster environments (``TorchElasticEnvironment``, ``SLURMEnvironment``, ...) do the
detection and the numbering; :func:`process_rank` asks them, in the order Lightning's Trainer does.
Hand-written here: Lightning sets the rank only inside ``Trainer(...)`` and its import-time guess
(``rank_zero_only.rank``) reads ``RANK`` / ``LOCAL_RANK`` alone, so on the second of two nodes started
with ``NODE_RANK=1 LOCAL_RANK=0`` it says 0; ``soe stitch`` needs the true rank earlier, to decide who
owns the run folder (its lock, ``recipe.yaml``, the logs) before anything is built. The requeue is
``scontrol requeue`` as Lightning's own SLURM auto-requeue calls it, but after the checkpoint of a
completed step is on disk (Lightning's handler saves from inside the signal handler, mid-step).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from soe.errors import RecipeError, one_line


def process_rank(devices, num_nodes: int = 1) -> int:
    """This process's global rank as Lightning's Trainer will number it (0 when nothing says otherwise).

    ``devices``: ``trainer.devices`` (a count or a list); it sets the processes per node for the
    processes a user started by hand (``LOCAL_RANK`` + ``NODE_RANK``: node_rank x devices + local_rank)."""
    from lightning.fabric.plugins.environments import LSFEnvironment, MPIEnvironment, SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):  # Lightning's order
        if env.detect():
            try:
                return int(env().global_rank())
            except RuntimeError as e:  # e.g. SLURM's --ntasks without --ntasks-per-node, which Lightning refuses
                raise RecipeError(f"trainer: {one_line(e, 300)}") from None
    if "LOCAL_RANK" in os.environ:  # LightningEnvironment with processes started outside Lightning
        if "RANK" in os.environ:
            return int(os.environ["RANK"])
        per_node = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, tuple)) else None
        node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
        if per_node is not None and per_node > 0:
            return node * per_node + int(os.environ["LOCAL_RANK"])
    return int(rank_zero_only.rank or 0)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes for this job (``<array job>_<task>`` for an array task), or None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this job (call once, from rank 0, after the checkpoint is written).
    Returns what happened, for the user's one line: ``requeued SLURM job 123`` or why not."""
    job = slurm_job_id()
    if job is None:
        return "not a SLURM job, so nothing was requeued"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return f"SLURM job {job} not requeued: scontrol is not on PATH"
    done = subprocess.run([scontrol, "requeue", job], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        why = " ".join((done.stderr or done.stdout).split())[:200]
        return f"SLURM job {job} not requeued: scontrol requeue exited {done.returncode} ({why})"
    return f"requeued SLURM job {job}"
