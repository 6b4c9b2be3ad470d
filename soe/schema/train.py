"""``flow``, ``data``, ``optim``, ``trainer``: what a training step draws and how Lightning runs it
(soe/flow/objective.py, soe/train/)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from soe.schema.base import Choice, OptionError, choice, require


class Timesteps(Choice):
    shared = "shared"  # one base flow time per clip for both modalities (UniVerse-1, LTX-2)
    independent = "independent"  # one per modality (MOVA)


class Density(Choice):
    uniform = "uniform"
    logit_normal = "logit_normal"


class Balance(Choice):
    none = "none"
    ema = "ema"  # each modality's loss divided by a running mean of itself


class DataKind(Choice):
    synthetic = "synthetic"
    latents = "latents"  # a latent cache written by `soe encode`


class Schedule(Choice):
    constant = "constant"
    cosine = "cosine"


class Strategy(Choice):
    """``trainer.strategy``: the Lightning strategies soe tests on CPU (2 gloo ranks, exact resume; tests/test_strategies.py)."""
    auto = "auto"  # Lightning's choice: one process, or DDP on several devices
    ddp = "ddp"  # DDP; several nodes with trainer.num_nodes (docs/cluster.md)
    fsdp2 = "fsdp2"  # per-parameter sharding (torch fully_shard) through Lightning's ModelParallelStrategy


# Strategies Lightning offers that soe does not: why, in the one line a recipe naming one gets
REFUSED_STRATEGIES = {
    "fsdp": "Lightning's FSDP1 strategy runs on CUDA only, so soe cannot test it on CPU",
    "deepspeed": "Lightning's DeepSpeed strategy runs on CUDA only, so soe cannot test it on CPU (ZeRO-2/3, exact resume)",
    "ddp_spawn": "it pickles the model into new processes; 'ddp' starts the same ranks by running the command again",
}


class NonFinite(Choice):
    stop = "stop"  # one-line error, exit 1
    skip = "skip"  # skip that optimizer step, warn


@dataclass
class FlowConfig:
    timesteps: Timesteps = Timesteps.shared
    density: Density = Density.logit_normal
    balance: Balance = Balance.none
    balance_momentum: float = 0.99
    # task per training sample (soe/flow/conditioning.py): joint | v2a | a2v | image | extend -> weight
    # (empty = {joint: 1.0}; recipe mappings merge key by key, so set a weight to 0 to drop a task)
    tasks: Dict[str, float] = field(default_factory=dict)
    extend_seconds: Optional[float] = None  # given seconds of the `extend` task; null = half the clip
    # share of training samples whose connectors read nothing (as the unconditional half of a CFG call): each
    # expert keeps working without the other modality's input (docs/evidence.md, joint audio)
    source_dropout: float = 0.0

    def __post_init__(self):
        self.timesteps = choice(Timesteps, self.timesteps, "timesteps")
        self.density = choice(Density, self.density, "density")
        self.balance = choice(Balance, self.balance, "balance")
        require(0 < self.balance_momentum < 1, "balance_momentum", f"expected a value in (0, 1), got {self.balance_momentum}")
        for name, weight in self.tasks.items():
            require(weight >= 0, f"tasks.{name}", f"expected a weight >= 0, got {weight}")
        if self.tasks and not sum(self.tasks.values()) > 0:
            raise OptionError("tasks", "the weights sum to 0; give at least one task a positive weight")
        require(0 <= self.source_dropout < 1, "source_dropout", f"expected a share in [0, 1), got {self.source_dropout}")
        require(self.extend_seconds is None or self.extend_seconds > 0, "extend_seconds",
                f"expected a positive number of seconds, got {self.extend_seconds}")


@dataclass
class DataConfig:
    kind: DataKind = DataKind.synthetic
    path: Optional[str] = None  # latent cache folder (kind: latents)
    seconds: float = 1.0
    batch_size: int = 4
    num_clips: int = 256  # synthetic clips
    num_workers: int = 0
    shuffle_chunks: int = 8  # streamed caches: windows are shuffled within groups of this many chunks (the buffer)
    cache_dir: Optional[str] = None  # local copy of a cache at a URL (s3://, gs://, ...); None: $SOE_CACHE_DIR or ~/.cache/soe

    def __post_init__(self):
        self.kind = choice(DataKind, self.kind, "kind")
        require(self.kind != DataKind.latents or self.path is not None, "path",
                "'latents' data needs the folder of a latent cache (see `soe encode`)")
        require(self.num_workers >= 0, "num_workers",
                f"expected >= 0 loader processes (0 = load in the training process), got {self.num_workers}")
        for k in ("batch_size", "num_clips"):
            require(getattr(self, k) >= 1, k, f"expected a positive integer, got {getattr(self, k)}")
        require(self.seconds > 0, "seconds", f"expected a positive clip length in seconds, got {self.seconds}")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: Schedule = Schedule.constant  # after warmup: constant, or cosine decay to zero at trainer.max_steps
    grad_clip: float = 1.0  # 0 = no clipping

    def __post_init__(self):
        require(0 < self.lr < math.inf, "lr", f"expected a positive finite learning rate, got {self.lr}")
        require(self.grad_clip >= 0, "grad_clip", f"expected a gradient-norm limit >= 0 (0 = no clipping), got {self.grad_clip}")
        require(self.weight_decay >= 0, "weight_decay", f"expected >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "warmup_steps", f"expected >= 0, got {self.warmup_steps}")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
                f"expected two values in [0, 1), got {list(self.betas)}")
        self.schedule = choice(Schedule, self.schedule, "schedule")


ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")  # Lightning's names soe runs on (no tpu: torch_xla is not supported)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp2 (fsdp, deepspeed_* and ddp_spawn are refused: use fsdp2 / ddp)
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    threads: Optional[int] = None  # torch CPU threads; null = soe's policy (soe/threads.py), env SOE_NUM_THREADS wins
    on_nonfinite: NonFinite = NonFinite.stop  # NaN/inf loss
    extra: Dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument

    def __post_init__(self):
        require(self.max_steps >= 1, "max_steps", f"expected a positive number of steps, got {self.max_steps}")
        for k in ("accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps", "num_nodes"):
            require(getattr(self, k) >= 1, k, f"expected a positive integer, got {getattr(self, k)}")
        require(self.threads is None or self.threads >= 1, "threads",
                f"expected a positive number of CPU threads (or null for soe's choice), got {self.threads}")
        self.on_nonfinite = choice(NonFinite, self.on_nonfinite, "on_nonfinite")
        # a name soe runs on (Lightning's error named no key; tpu was a traceback); whether this machine has it is
        # checked when training starts (soe.train.build.check_machine), so a GPU recipe inspects anywhere
        require(self.accelerator in ACCELERATORS, "accelerator", f"expected one of {', '.join(ACCELERATORS)}, got {self.accelerator!r}")
        self.strategy = _strategy(self.strategy)


def _strategy(name) -> Strategy:
    """``trainer.strategy`` as a :class:`Strategy`, or one line saying why a Lightning strategy is refused."""
    name = str(name)
    family = next((k for k in REFUSED_STRATEGIES if name == k or name.startswith(k + "_")), None)
    if family is not None and name not in Strategy.names():
        instead = "ddp" if family == "ddp_spawn" else "fsdp2"
        raise OptionError("strategy", f"'{name}' is not offered: {REFUSED_STRATEGIES[family]}; use '{instead}' "
                                      f"(one of {Strategy.names()})")
    return choice(Strategy, name, "strategy")


def is_url(folder) -> bool:
    """An object-store or litdata URL (s3://, gs://, local:, file://, ...) rather than a local folder."""
    return isinstance(folder, str) and ("://" in folder or folder.startswith("local:"))

