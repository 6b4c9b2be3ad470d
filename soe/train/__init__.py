"""Training under Lightning: ``module`` (the LightningModule around a Stitcher and its flow objective),
``build`` (recipe -> what trains, the objective, the Trainer and its strategy), ``sharding`` (FSDP2:
experts filled shard by shard, values equal to a single-process build), ``storage`` (fp8 storage of frozen
layers), ``checkpoint`` (atomic checkpoints) and ``trained`` (the ``trained/`` folder and merged exports),
``run_folder`` (lock, recipe changes on resume), ``cluster`` (rank 0 under srun / torchrun / NODE_RANK,
SLURM requeue), ``interrupt`` / ``critical`` (Ctrl-C, SIGTERM, SIGUSR1), ``log_rows``,
``progress``, ``plots`` and ``single`` (one expert alone). May import :mod:`soe.data`, :mod:`soe.recipe`,
:mod:`soe.flow`, :mod:`soe.lora`, :mod:`soe.stitch` and below; never sampling or the command line.
"""
import warnings

# Lightning's own use of a deprecated torch pytree API: not actionable by users, keep output clean.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
