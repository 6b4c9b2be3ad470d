"""The recipe schema: the option dataclasses the code takes, which OmegaConf also reads as the
structured config of a recipe file. Each option is declared once, here, one file per recipe section
(and ``annotate.py`` / ``encode.py``: the ``annotate.*`` / ``encode.*`` settings of ``soe annotate`` / ``soe encode``).
Every layer takes these dataclasses, so the schema sits low: it may import only :mod:`soe.errors`.

    >>> from soe.schema import ConnectorConfig, build
    >>> build(ConnectorConfig, {"init": "trunc_normal"}).init
    'trunc_normal'
"""
from __future__ import annotations

from dataclasses import dataclass, field

from soe.schema.annotate import AnnotateConfig
from soe.schema.encode import EncodeConfig
from soe.schema.base import Choice, Dtype, OptionError, RecipeError, StorageDtype, build, choice, command_settings, require
from soe.schema.experts import ExpertConfig, ExpertsConfig, LoraConfig, TrainMode
from soe.schema.sample import SampleConfig, SamplerConfig, Scheduler, SpeedConfig
from soe.schema.stitch import (ConnectorConfig, ConnectorPool, DepthConfig, DepthMode, Direction, Engine, InjectConfig,
                               InjectMode, KVTargetConfig, StitchConfig)
from soe.schema.train import DataConfig, FlowConfig, NonFinite, OptimConfig, TrainerConfig


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 0
    run_dir: str = "runs/${name}"
    resume: bool = False
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):  # the range every RNG soe seeds (numpy's included) accepts
        require(0 <= self.seed < 2**32, "seed", f"expected an integer in [0, 2**32 - 1], got {self.seed}")


SECTIONS = ("experts", "stitch", "flow", "data", "optim", "trainer", "sample")

__all__ = ["AnnotateConfig", "Choice", "ConnectorConfig", "ConnectorPool", "DataConfig", "DepthConfig", "DepthMode", "Direction", "Dtype", "EncodeConfig",
           "Engine", "ExpertConfig",
           "ExpertsConfig", "FlowConfig", "InjectConfig", "InjectMode", "KVTargetConfig", "LoraConfig", "NonFinite", "OptimConfig",
           "OptionError", "Recipe", "RecipeError", "SECTIONS", "SampleConfig", "SamplerConfig", "Scheduler", "SpeedConfig",
           "StitchConfig", "StorageDtype", "TrainMode", "TrainerConfig", "build", "choice", "command_settings"]
