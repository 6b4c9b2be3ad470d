"""``sample``: how ``soe generate`` (and sampling during training) integrates, what it is given, and
the memory/speed switches (soe/sample/sampler.py takes a ``SamplerConfig``, soe/sample/speed.py a ``SpeedConfig``;
the ``sample`` section is both)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from soe.schema.base import Choice, OptionError, StorageDtype, check_device, choice, optional_choice, require

# conditioning inputs of `soe generate` (at most one): sample.<key> -> the task it asks of the experts
TRAINING_EVAL = ("av_align",)  # `soe eval` metrics sample.eval may name: those that need no weights
SAMPLING_TASKS = ("joint", "v2a", "a2v", "image", "extend")  # the tasks of soe/flow/conditioning.py (its TASKS)
SYNC_TASKS = ("joint", "v2a", "a2v")  # sample.sync_tasks: what the held-out clips are sampled as (soe/sample/held_out_tasks.py)
GIVEN_MEDIA = {"image": "image", "video": "v2a", "audio": "a2v", "extend": "extend"}


# attention backend -> (module it imports, package to install); the dispatcher also checks versions and devices
_BACKEND_NEEDS = {
    "flash": ("flash_attn", "flash-attn"), "flash_varlen": ("flash_attn", "flash-attn"),
    "_flash_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface, built from flash-attention's hopper/)"),
    "_flash_varlen_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface, built from flash-attention's hopper/)"),
    "xformers": ("xformers", "xformers"), "_native_npu": ("torch_npu", "torch_npu"), "_native_xla": ("torch_xla", "torch_xla"),
    "aiter": ("aiter", "aiter"),
}
_MIN_VERSION = {"sageattention": (2, 1, 1), "flash-attn": (2, 6, 3), "kernels": (0, 12, 0)}


def missing_attention_package(backend: str) -> str | None:
    """The package diffusers' attention backend ``backend`` needs that is not installed, or None."""
    import importlib.util

    if backend.endswith("_hub"):
        mod, pkg = "kernels", "kernels"
    elif backend.lstrip("_").startswith("sage"):
        mod, pkg = "sageattention", "sageattention"
    elif backend in _BACKEND_NEEDS:
        mod, pkg = _BACKEND_NEEDS[backend]
    else:
        return None
    if importlib.util.find_spec(mod) is None:
        return pkg
    low = _MIN_VERSION.get(pkg)
    if low is not None:  # diffusers refuses older releases of these at run time
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version(pkg)
        except PackageNotFoundError:
            return None
        if tuple(int(x) for x in re.findall(r"\d+", found)[:3]) < low:
            return f"{pkg}>={'.'.join(map(str, low))} (found {found})"
    return None


class Scheduler(Choice):  # diffusers flow-matching schedulers
    unipc = "unipc"
    euler = "euler"


class Memory(Choice):
    none = "none"
    offload_blocks = "offload_blocks"  # blocks wait on the CPU, moved to the device just before they run
    offload_model = "offload_model"  # each model on the device only while it is used


class StepCacheMode(Choice):
    none = "none"
    first_block = "first_block"  # skip all later blocks on steps where the first blocks barely change


class Decode(Choice):
    codec = "codec"  # each expert's own codec
    synthetic_preview = "synthetic_preview"  # what synthetic-task latents mean (the demo)


class GivenUncond(Choice):
    keep = "keep"  # CFG's unconditional half sees the given frames clean
    zeros = "zeros"  # ... or zeros (UniVerse-1)


@dataclass
class SamplerConfig:
    """The joint sampler: shared timestep grid, per-expert CFG scale and schedule shift."""

    steps: int = 30
    scheduler: Scheduler = Scheduler.unipc
    guidance: Dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 1.0})  # CFG scale per expert
    shift: Dict[str, Optional[float]] = field(default_factory=dict)  # per expert; null = its flow_shift
    seed: int = 0
    # CFG's conditional and unconditional halves in one forward of 2B (true) or two forwards of B (false, lower
    # activation peak); null = auto: one forward unless sample.memory offloads
    cfg_batched: Optional[bool] = None
    # [lo, hi]: CFG only at steps whose sigma (in (0, 1], after the expert's shift) lies in (lo, hi]; elsewhere the
    # conditional prediction alone, one forward of B (Kynkaanniemi et al. 2024); null = CFG at every step
    guidance_interval: Optional[List[float]] = None
    # per expert side, the sampling tasks (joint, v2a, a2v, image, extend) that run that expert without its LoRA
    # (soe/lora/task_gate.py loras_off); e.g. {b: [joint, image]}: the audio LoRA only where the video is given
    lora_off: Dict[str, List[str]] = field(default_factory=dict)
    # per expert, guidance over the other modality: the velocity gains (scale - 1) x (stitched - the expert alone, same
    # text, no connectors); 1 = off. {b: 1.75}: the audio follows the video more (docs/evidence.md, "Cross-modal guidance")
    cross_guidance: Dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 1.0})

    def __post_init__(self):
        self.scheduler = choice(Scheduler, self.scheduler, "scheduler")
        for side, tasks in self.lora_off.items():
            require(side in ("a", "b"), f"lora_off.{side}", "expected keys 'a' and 'b' (the two experts)")
            bad = [t for t in tasks if t not in SAMPLING_TASKS]
            require(not bad, f"lora_off.{side}", f"expected tasks among {list(SAMPLING_TASKS)}, got {bad[0] if bad else ''!r}")
        require(self.steps >= 1, "steps", f"expected a positive integer, got {self.steps}")
        for key in ("guidance", "shift", "cross_guidance"):
            for side, value in getattr(self, key).items():
                require(side in ("a", "b"), f"{key}.{side}", "expected keys 'a' and 'b' (the two experts)")
                require(value is None or 0 < value < math.inf, f"{key}.{side}", f"expected a positive finite number, got {value}")
        require(0 <= self.seed < 2**32, "seed", f"expected an integer in [0, 2**32 - 1], got {self.seed}")
        gi = self.guidance_interval
        require(gi is None or (len(gi) == 2 and 0 <= gi[0] < gi[1]), "guidance_interval",
                f"expected null or [lo, hi] with 0 <= lo < hi (sigmas), got {None if gi is None else list(gi)}")


@dataclass
class SpeedConfig:
    """Memory and speed switches, all through diffusers hooks (soe/sample/speed.py)."""

    memory: Memory = Memory.none
    storage_dtype: Optional[StorageDtype] = None  # weights stored in fp8, computed in the expert's dtype
    compile: bool = False  # torch.compile each block (regional compilation)
    attention_backend: Optional[str] = None  # diffusers attention dispatcher backend (flash, _native_cudnn, ...); null = torch SDPA
    cache: StepCacheMode = StepCacheMode.none
    # first_block: relative change of the first blocks' residual below which a step is skipped; 0.1: the largest whose
    # sync and Frechet distances stayed within noise of exact sampling on the trained synthetic experts (docs/speed.md)
    cache_threshold: float = 0.1

    def __post_init__(self):
        self.memory = choice(Memory, self.memory, "memory")
        self.storage_dtype = optional_choice(StorageDtype, self.storage_dtype, "storage_dtype")
        self.cache = choice(StepCacheMode, self.cache, "cache")
        require(self.cache_threshold >= 0, "cache_threshold", f"expected a number >= 0, got {self.cache_threshold}")
        if self.attention_backend is not None:
            from diffusers.models.attention_dispatch import AttentionBackendName

            names = sorted(b.value for b in AttentionBackendName)
            require(self.attention_backend in names, "attention_backend", f"expected null or one of {names}, got {self.attention_backend!r}")
            missing = missing_attention_package(self.attention_backend)
            require(missing is None, "attention_backend", f"backend {self.attention_backend!r} needs the package {missing}, which is not installed")


@dataclass
class SampleConfig(SpeedConfig, SamplerConfig):  # fields: the sampler's, the speed switches', then these
    ckpt: Optional[str] = None  # run folder of `soe stitch` (or its trained/ folder); null = untrained connectors
    prompt: str = ""
    prompts: Optional[str] = None  # JSON lines {id, prompt, image?, ...} or a Verse-Bench folder: one sample per row, files named by id (soe/sample/prompt_rows.py)
    # CFG null branch of experts that take a negative prompt (Wan): its own text encoder's encoding of this
    negative_prompt: str = ""
    conditions: Optional[str] = None  # safetensors of precomputed conditioning: "a/<key>", "b/<key>" (+ "a/negative/<key>")
    seconds: Optional[float] = None  # null = data.seconds
    num_samples: int = 1
    out: Optional[str] = None  # null = <run_dir>/samples
    every_n_steps: int = 0  # during training: render samples every K steps (0 = never)
    at_end: bool = False  # during training: render once when training ends
    at_start: bool = False  # during training: also render before the first step (zero-init connectors = the experts alone)
    eval: List[str] = field(default_factory=list)  # during training: `soe eval` metrics of each render, logged as eval/<name> (weight-free: av_align)
    sync_clips: int = 0  # AV-Align of N held-out clips before and after training (0 = off; synthetic data only, else skipped)
    sync_tasks: List[str] = field(default_factory=lambda: ["joint"])  # held-out tasks: joint | v2a (true video given) | a2v (true audio given)
    sync_media: bool = False  # also decode the held-out samples to mp4 (samples/held_out/) and score them with `soe eval`'s av_align
    decode: Decode = Decode.codec
    device: Optional[str] = None  # null = cuda when available, else cpu
    # conditioning media (at most one; soe/sample/given_media.py): encoded by the expert's own codec, kept clean
    image: Optional[str] = None  # reference image -> first video latent frame (UniVerse-1)
    video: Optional[str] = None  # video file -> the whole video (video-to-audio)
    audio: Optional[str] = None  # audio (or video with sound) file -> the whole audio (audio-to-video)
    extend: Optional[str] = None  # video with sound -> the first extend_seconds of both
    extend_seconds: Optional[float] = None  # null = half of the clip
    given_uncond: GivenUncond = GivenUncond.keep  # CFG's unconditional half at given frames

    def __post_init__(self):
        SamplerConfig.__post_init__(self)
        SpeedConfig.__post_init__(self)
        self.decode = choice(Decode, self.decode, "decode")
        self.given_uncond = choice(GivenUncond, self.given_uncond, "given_uncond")
        given = [k for k in GIVEN_MEDIA if getattr(self, k) is not None]
        if len(given) > 1:
            raise OptionError(given[1], f"give one conditioning input at a time, got {' and '.join(k + '=' for k in given)}")
        require(self.num_samples >= 1, "num_samples", f"expected a positive integer, got {self.num_samples}")
        check_device(self.device, "device")
        require(self.seconds is None or 0 < self.seconds < math.inf, "seconds", f"expected a positive duration in seconds, got {self.seconds}")
        for name in self.eval:
            require(name in TRAINING_EVAL, "eval", f"expected metrics among {list(TRAINING_EVAL)} (weight-free), got {name!r}")
        require(self.sync_clips >= 0, "sync_clips", f"expected >= 0 held-out clips (0 = off), got {self.sync_clips}")
        require(len(self.sync_tasks) > 0 and all(t in SYNC_TASKS for t in self.sync_tasks) and len(set(self.sync_tasks)) == len(self.sync_tasks),
                "sync_tasks", f"expected distinct tasks among {list(SYNC_TASKS)}, got {list(self.sync_tasks)}")
        require(self.every_n_steps >= 0, "every_n_steps", f"expected >= 0 (0 = never), got {self.every_n_steps}")
        require(self.extend_seconds is None or 0 < self.extend_seconds < math.inf, "extend_seconds",
                f"expected a positive number of seconds, got {self.extend_seconds}")
