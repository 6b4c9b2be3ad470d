"""``experts.a`` / ``experts.b``: which model, which weights, what trains (soe/recipe/builders.py, soe/lora/adapters.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from soe.schema.base import Choice, Dtype, OptionError, StorageDtype, choice, optional_choice, require

POSITIVE_OPTIONS = ("fps", "sample_rate", "height", "width", "num_frames", "channels")  # expert options that are sizes or rates


class TrainMode(Choice):
    lora = "lora"  # peft LoRA adapters train, the expert's weights stay frozen
    frozen = "frozen"
    full = "full"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Optional[List[str]] = None  # regexes over module names; null = the plugin's lora_targets
    init_from: Optional[str] = None  # start from a LoRA file/folder (diffusers, peft or ComfyUI); its r, alpha, targets win
    # what the LoRA learns from (soe/lora/task_gate.py): the gradient of these flow.tasks' samples only (null = all)
    tasks: Optional[List[str]] = None
    preserve: float = 0.0  # weight of |pred - pred with this LoRA off|^2 in this expert's loss (0 = off)
    lr_scale: float = 1.0  # the LoRA's learning rate = optim.lr * lr_scale (connectors: optim.lr)
    # the samples of these flow.tasks run without this LoRA in training (train as sample.lora_off samples; null = none)
    off_tasks: Optional[List[str]] = None

    def __post_init__(self):
        require(self.r >= 1, "r", f"expected a positive rank, got {self.r}")
        require(self.alpha > 0, "alpha", f"expected a positive scale, got {self.alpha} (alpha 0 makes the LoRA a no-op)")
        require(0 <= self.dropout < 1, "dropout", f"expected a value in [0, 1), got {self.dropout}")
        require(self.preserve >= 0, "preserve", f"expected a weight >= 0, got {self.preserve}")
        require(self.lr_scale >= 0, "lr_scale", f"expected a factor >= 0, got {self.lr_scale}")
        require(self.tasks is None or len(self.tasks) > 0, "tasks", "expected at least one task (null = every task)")


@dataclass
class ExpertConfig:
    name: str = MISSING  # registry key, see `soe experts`
    preset: Optional[str] = None  # architecture preset (tiny, 1.3b, ...); builds random weights unless `path` is set
    path: Optional[str] = None  # local checkpoint folder in the family's official format
    dtype: Dtype = Dtype.float32
    options: Dict[str, Any] = field(default_factory=dict)  # expert options (fps, sample_rate, height, ...)
    architecture: Dict[str, Any] = field(default_factory=dict)  # model-config overrides of `preset` (unused with `path`)
    train: TrainMode = TrainMode.lora
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    flow_shift: Optional[float] = None  # null = the plugin's own schedule shift
    loss_weight: float = 1.0
    codec_path: Optional[str] = None  # local folder of the family's latent codec (VAE); null = tiny random codec
    text_encoder_path: Optional[str] = None  # local folder of the family's text encoder (+ tokenizer)
    storage_dtype: Optional[StorageDtype] = None  # training: frozen weights stored in fp8

    def __post_init__(self):
        self.dtype = choice(Dtype, self.dtype, "dtype")
        self.train = choice(TrainMode, self.train, "train")
        self.storage_dtype = optional_choice(StorageDtype, self.storage_dtype, "storage_dtype")
        if self.storage_dtype is not None and self.train == TrainMode.full:
            raise OptionError("storage_dtype", "fp8 storage is for frozen weights; this expert trains fully (train: full)")
        require(self.flow_shift is None or self.flow_shift > 0, "flow_shift", f"expected a positive shift, got {self.flow_shift}")
        require(self.loss_weight >= 0, "loss_weight", f"expected >= 0, got {self.loss_weight}")
        for opt, value in self.options.items():
            if opt in POSITIVE_OPTIONS and isinstance(value, (int, float)):
                require(value > 0, f"options.{opt}", f"expected a positive number, got {value}")


@dataclass
class ExpertsConfig:
    a: ExpertConfig = field(default_factory=ExpertConfig)
    b: ExpertConfig = field(default_factory=ExpertConfig)

    def __post_init__(self):
        if self.a.dtype != self.b.dtype:
            raise OptionError("b.dtype", f"{self.b.dtype!r} differs from experts.a.dtype {self.a.dtype!r}; stitched experts compute "
                              "in one dtype (for mixed precision keep both float32 and use trainer.precision=bf16-mixed)")
