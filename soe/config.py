"""Recipe schema (OmegaConf structured configs), loading, ``key=value`` overrides and validation.

A recipe is one YAML file. ``load_recipe`` merges it and the overrides onto the schema, so unknown
keys and wrong types fail at once; ``validate_recipe`` then checks what types cannot (known expert
names and presets, existing checkpoint folders, block pairs in range, ...). Every failure is a
:class:`RecipeError` whose one-line message names the key and what was expected.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from soe.errors import SoeError

TRAIN_MODES = ("lora", "frozen", "full")
DTYPES = ("float32", "bfloat16", "float16")
POSITIVE_OPTIONS = ("fps", "sample_rate", "height", "width", "num_frames", "channels")  # expert options that are sizes or rates


class RecipeError(SoeError, ValueError):
    """A recipe problem, reported as one line: ``<key>: <what is wrong and what was expected>``."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Optional[List[str]] = None  # regexes over module names; null = the plugin's lora_targets
    init_from: Optional[str] = None  # start from a LoRA file/folder (diffusers, peft or ComfyUI); its r, alpha, targets win


@dataclass
class ExpertConfig:
    name: str = MISSING  # registry key, see `soe experts`
    preset: Optional[str] = None  # architecture preset (tiny, 1.3b, ...); builds random weights unless `path` is set
    path: Optional[str] = None  # local checkpoint folder in the family's official format
    dtype: str = "float32"
    options: Dict[str, Any] = field(default_factory=dict)  # expert options (fps, sample_rate, height, ...)
    architecture: Dict[str, Any] = field(default_factory=dict)  # model-config overrides of `preset` (unused with `path`)
    train: str = "lora"  # lora | frozen | full
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    flow_shift: Optional[float] = None  # null = the plugin's own schedule shift
    loss_weight: float = 1.0
    codec_path: Optional[str] = None  # local folder of the family's latent codec (VAE); null = tiny random codec
    text_encoder_path: Optional[str] = None  # local folder of the family's text encoder (+ tokenizer)
    storage_dtype: Optional[str] = None  # training: null | float8_e4m3fn | float8_e5m2 (frozen weights stored in fp8)


@dataclass
class ExpertsConfig:
    a: ExpertConfig = field(default_factory=ExpertConfig)
    b: ExpertConfig = field(default_factory=ExpertConfig)


@dataclass
class ConnectorConfig:
    mlp: str = "mlp"  # mlp | glu | swiglu (timm.layers)
    hidden: Optional[int] = None  # null = D_src + D_host
    act: str = "silu"
    init: str = "zero"  # zero | trunc_normal
    resample: str = "auto"  # auto | linear | area
    input_norm: bool = False
    pool: str = "mean"  # mean (UniVerse-1) | moments (mean + where in the frame: soe.align.pool_time_moments)


@dataclass
class DepthConfig:
    mode: str = "none"  # none | insert_interpolated (expand the shallower expert, soe/depth.py)
    every: Optional[int] = None  # insert after every k-th original block; null = spread evenly


@dataclass
class KVTargetConfig:  # one attention module of the host block that receives extra keys/values
    attention: str = MISSING  # module path in the host block, e.g. attn2
    mode: str = "concat"  # concat (one softmax) | parallel (separate attention added before to_out)
    window: bool = False  # each host token attends only to the injected tokens of its own time step
    pre_norm: Optional[str] = None  # host block module whose input the injected tokens join
    rope: str = "none"  # none | complex | cat: 1-D temporal RoPE on injected keys
    rope_theta: float = 10000.0
    rope_query: bool = False  # also rotate the host queries by their time step
    init: str = "copy"  # copy | random: new k/v projections start as copies of copy_from's to_k/to_v
    copy_from: Optional[str] = None  # null = `attention`
    cfg_mask: bool = True  # the unconditional CFG branch zeroes these tokens


@dataclass
class InjectConfig:
    mode: str = "add"  # add | attention_kv (soe/inject.py)
    tap: Optional[str] = None  # tap point declared by the source plugin; null = block output
    targets: List[KVTargetConfig] = field(default_factory=list)


@dataclass
class StitchConfig:
    pairs: Any = "linear"  # linear | identity | {every: k} | [[i, j], ...]
    direction: str = "both"  # a_to_b | b_to_a | both
    detach_source: bool = True
    engine: str = "auto"  # auto | hooks | lockstep
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    inject: Dict[str, InjectConfig] = field(default_factory=dict)  # per direction (a_to_b, b_to_a); default add


@dataclass
class FlowConfig:
    timesteps: str = "shared"  # shared | independent
    density: str = "logit_normal"  # uniform | logit_normal
    balance: str = "none"  # none | ema
    balance_momentum: float = 0.99
    # task per training sample (soe/conditioning.py): joint | v2a | a2v | image | extend -> weight
    # (empty = {joint: 1.0}; recipe mappings merge key by key, so set a weight to 0 to drop a task)
    tasks: Dict[str, float] = field(default_factory=dict)
    extend_seconds: Optional[float] = None  # given seconds of the `extend` task; null = half the clip


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | latents
    path: Optional[str] = None  # latent cache folder (kind: latents)
    seconds: float = 1.0
    batch_size: int = 4
    num_clips: int = 256  # synthetic clips
    num_workers: int = 0
    shuffle_chunks: int = 8  # streamed caches: windows are shuffled within groups of this many chunks (the buffer)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_spawn | fsdp | fsdp2 | deepspeed_stage_2 | ...
    precision: str = "32-true"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 50
    threads: Optional[int] = None  # torch CPU threads; null = soe's policy (soe/threads.py), env SOE_NUM_THREADS wins
    on_nonfinite: str = "stop"  # NaN/inf loss: stop (one-line error, exit 1) | skip (skip that optimizer step, warn)
    extra: Dict[str, Any] = field(default_factory=dict)  # any other lightning.Trainer argument


@dataclass
class SampleConfig:
    ckpt: Optional[str] = None  # run folder of `soe stitch` (or its trained/ folder); null = untrained connectors
    prompt: str = ""
    # CFG null branch of experts that take a negative prompt (Wan): its own text encoder's encoding of this
    negative_prompt: str = ""
    conditions: Optional[str] = None  # safetensors of precomputed conditioning: "a/<key>", "b/<key>" (+ "a/negative/<key>")
    seconds: Optional[float] = None  # null = data.seconds
    seed: int = 0
    steps: int = 30
    scheduler: str = "unipc"  # unipc | euler
    guidance: Dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 1.0})  # CFG scale per expert
    shift: Dict[str, Optional[float]] = field(default_factory=dict)  # per expert; null = its flow_shift
    num_samples: int = 1
    out: Optional[str] = None  # null = <run_dir>/samples
    every_n_steps: int = 0  # during training: render samples every K steps (0 = never)
    at_end: bool = False  # during training: render once when training ends
    at_start: bool = False  # during training: also render before the first step (zero-init connectors = the experts alone)
    sync_clips: int = 0  # AV-Align of N held-out clips before and after training (0 = off; synthetic data only, else skipped)
    decode: str = "codec"  # codec (each expert's codec) | synthetic_preview (what synthetic-task latents mean)
    # memory and speed (soe/speed.py): all through diffusers hooks
    device: Optional[str] = None  # null = cuda when available, else cpu
    memory: str = "none"  # none | offload_blocks (blocks wait on the CPU) | offload_model (each model on the device while used)
    storage_dtype: Optional[str] = None  # null | float8_e4m3fn | float8_e5m2: weights stored in fp8, computed in the expert's dtype
    compile: bool = False  # torch.compile each block (regional compilation)
    attention_backend: Optional[str] = None  # diffusers attention dispatcher backend (flash, _native_cudnn, ...); null = torch SDPA
    cache: str = "none"  # none | first_block: skip all later blocks on steps where the first blocks barely change
    cache_threshold: float = 0.05  # first_block: relative change of the first blocks' residual below which a step is skipped
    # conditioning media (at most one; soe/given_media.py): encoded by the expert's own codec, kept clean
    image: Optional[str] = None  # reference image -> first video latent frame (UniVerse-1)
    video: Optional[str] = None  # video file -> the whole video (video-to-audio)
    audio: Optional[str] = None  # audio (or video with sound) file -> the whole audio (audio-to-video)
    extend: Optional[str] = None  # video with sound -> the first extend_seconds of both
    extend_seconds: Optional[float] = None  # null = half of the clip
    given_uncond: str = "keep"  # CFG's unconditional half at given frames: keep (clean) | zeros (UniVerse-1)


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


def _oc_error(e: Exception) -> RecipeError:
    key = getattr(e, "full_key", None) or "recipe"
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    return RecipeError(f"{key}: {msg}")


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with soe (package data ``soe/recipes``), by name: ``{"demo": .../demo.yaml}``."""
    import soe.recipes

    return {p.stem: p for p in sorted(Path(soe.recipes.__file__).parent.glob("*.yaml"))}


def find_recipe(path) -> Path:
    """``path`` itself when it is a file, else a shipped recipe named ``path`` (``demo`` or ``demo.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if path.parent == Path(".") and path.name.removesuffix(".yaml") in shipped:
        return shipped[path.name.removesuffix(".yaml")]
    raise RecipeError(f"recipe: file not found: '{path}' (shipped recipes by name: {', '.join(shipped)})")


def load_recipe(path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Read a recipe YAML (a file, or a shipped recipe by name), apply ``key=value`` overrides and
    check it against the schema."""
    path = find_recipe(path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors, or a document that is a single scalar
        if "Invalid loaded object type" in str(e):
            raise RecipeError(f"recipe: '{path}' must be a mapping of keys, got a single value") from None
        raise RecipeError(f"recipe: '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"recipe: '{path}' must be a mapping of keys, got a {type(raw).__name__}")
    cfg = merge_recipe(raw, overrides)
    given = {o.partition("=")[0] for o in overrides}
    for key in RECIPE_RELATIVE_KEYS:
        value = OmegaConf.select(cfg, key)
        if key not in given and value and not Path(value).is_absolute() and (path.parent / value).exists():
            OmegaConf.update(cfg, key, str(path.parent / value), merge=False)
    return cfg


# Weights a recipe file ships with or points at: a relative path written in the recipe file is found
# next to the recipe first (so `soe stitch demo` finds recipes/pretrained/ wherever soe is installed),
# then in the working directory. Paths given as key=value on the command line are working-directory paths.
RECIPE_RELATIVE_KEYS = tuple(f"experts.{side}.{key}" for side in ("a", "b") for key in ("path", "codec_path", "text_encoder_path"))


LITERAL_KEYS = ("sample.prompt", "sample.negative_prompt")  # free text: taken as typed, never parsed as YAML or interpolated


def literal(text: str) -> str:
    """``text`` escaped so OmegaConf reads it back verbatim (``${x}`` is not an interpolation)."""
    # OmegaConf reads "\\" before "${" as one backslash and a lone "\" as escaping the "${"
    return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)


def merge_recipe(raw, overrides=()) -> DictConfig:
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"override '{o}': expected key=value")
    texts = {k: v for k, _, v in (o.partition("=") for o in overrides) if k in LITERAL_KEYS}
    overrides = [o for o in overrides if o.partition("=")[0] not in LITERAL_KEYS]
    for section in ("experts", "stitch", "flow", "data", "optim", "trainer", "sample"):
        value = raw.get(section) if isinstance(raw, DictConfig) else None
        if value is not None and not isinstance(value, DictConfig):
            raise RecipeError(f"{section}: expected a mapping of keys, got {type(OmegaConf.to_object(value) if OmegaConf.is_config(value) else value).__name__}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), raw, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)  # leaves the text of an escaped "\${...}" in a recipe file unescaped: escape it again
        for key in LITERAL_KEYS:
            parent, _, leaf = key.rpartition(".")
            text = texts.get(key, OmegaConf.select(cfg, parent)._get_node(leaf)._value())  # raw text, not re-interpolated
            if isinstance(text, str):
                OmegaConf.update(cfg, key, literal(text), merge=False)
        OmegaConf.to_container(cfg, throw_on_missing=True)
    except oc_errors.OmegaConfBaseException as e:
        raise _oc_error(e) from None
    return cfg


def _choice(value, allowed, key):
    if value not in allowed:
        raise RecipeError(f"{key}: expected one of {list(allowed)}, got {value!r}")


def validate_recipe(cfg: DictConfig, check_paths: bool = True) -> None:
    """Semantic checks no type can express. ``check_paths=False`` for meta-device inspection."""
    from soe.align import DepthMapError, resolve_depth_map
    from soe.connector import ConnectorSpec
    from soe.registry import UnknownExpertError, get_expert
    from soe.stitcher import DIRECTIONS, ENGINES

    blocks = {}
    for side in ("a", "b"):
        e, key = cfg.experts[side], f"experts.{side}"
        try:
            cls = get_expert(e.name)
        except UnknownExpertError as err:
            raise RecipeError(f"{key}.name: {err}") from None
        if e.preset is None and e.path is None:
            raise RecipeError(f"{key}: give 'preset' (random weights of a known architecture) or 'path' (a checkpoint folder)")
        if e.preset is not None and e.preset not in cls.presets:
            raise RecipeError(f"{key}.preset: expert '{e.name}' has no preset '{e.preset}'; expected one of {sorted(cls.presets)}")
        if check_paths and e.path is not None and not Path(e.path).is_dir():
            raise RecipeError(f"{key}.path: checkpoint folder not found: '{e.path}'")
        _choice(e.dtype, DTYPES, f"{key}.dtype")
        _choice(e.train, TRAIN_MODES, f"{key}.train")
        if e.storage_dtype is not None:
            from soe.speed import STORAGE_DTYPES

            _choice(e.storage_dtype, tuple(STORAGE_DTYPES), f"{key}.storage_dtype")
            if e.train == "full":
                raise RecipeError(f"{key}.storage_dtype: fp8 storage is for frozen weights; this expert trains fully (train: full)")
            if any(x in str(cfg.trainer.strategy) for x in ("fsdp", "deepspeed")):
                raise RecipeError(f"{key}.storage_dtype: fp8 storage runs with strategy ddp/auto on one or more GPUs, "
                                  f"not '{cfg.trainer.strategy}' (sharding wants one dtype per flat parameter)")
        if e.train == "lora":
            if e.lora.r < 1:
                raise RecipeError(f"{key}.lora.r: expected a positive rank, got {e.lora.r}")
            if not e.lora.alpha > 0:
                raise RecipeError(f"{key}.lora.alpha: expected a positive scale, got {e.lora.alpha} (alpha 0 makes the LoRA a no-op)")
            if not 0 <= e.lora.dropout < 1:
                raise RecipeError(f"{key}.lora.dropout: expected a value in [0, 1), got {e.lora.dropout}")
            if check_paths and e.lora.init_from is not None and not Path(e.lora.init_from).exists():
                raise RecipeError(f"{key}.lora.init_from: LoRA file or folder not found: '{e.lora.init_from}'")
        if e.flow_shift is not None and e.flow_shift <= 0:
            raise RecipeError(f"{key}.flow_shift: expected a positive shift, got {e.flow_shift}")
        if e.loss_weight < 0:
            raise RecipeError(f"{key}.loss_weight: expected >= 0, got {e.loss_weight}")
        for opt, value in e.options.items():
            if opt in POSITIVE_OPTIONS and isinstance(value, (int, float)) and not value > 0:
                raise RecipeError(f"{key}.options.{opt}: expected a positive number, got {value}")
        try:
            blocks[side] = _num_blocks(cls, e)
        except TypeError as err:  # an option the expert or its model does not take
            raise RecipeError(f"{key}.{'architecture' if _names_model_key(err, e) else 'options'}: {err}") from None
        longest = _max_seconds(cls, e)
        for skey, secs in (("data.seconds", cfg.data.seconds), ("sample.seconds", cfg.sample.seconds)):
            if longest is not None and secs is not None and secs > longest:
                raise RecipeError(f"{skey}: {secs} s is longer than expert {side} ('{e.name}') can position "
                                  f"(at most {longest:.1f} s with this architecture)")
        if blocks[side] < 1:
            which = next((f"{key}.architecture.{k}" for k in e.architecture if "layers" in k), f"{key}.architecture")
            raise RecipeError(f"{which}: expert '{e.name}' would have {blocks[side]} blocks; expected at least one")
    if cfg.experts.a.dtype != cfg.experts.b.dtype:
        raise RecipeError(f"experts.b.dtype: {cfg.experts.b.dtype!r} differs from experts.a.dtype {cfg.experts.a.dtype!r}; stitched "
                          "experts compute in one dtype (for mixed precision keep both float32 and use trainer.precision=bf16-mixed)")
    s = cfg.stitch
    _choice(s.direction, DIRECTIONS, "stitch.direction")
    _choice(s.engine, ENGINES, "stitch.engine")
    if s.engine == "hooks" and s.direction == "both":
        raise RecipeError("stitch.engine: 'hooks' runs one-way stitches only; use 'lockstep' or 'auto' with direction 'both'")
    try:
        ConnectorSpec(**OmegaConf.to_container(s.connector))
    except ValueError as err:
        raise RecipeError(f"stitch.{err}") from None
    depths = _validate_fusion(s, blocks)
    pairs = OmegaConf.to_container(s.pairs) if OmegaConf.is_config(s.pairs) else s.pairs
    try:
        resolve_depth_map(pairs, *depths)
    except DepthMapError as err:
        raise RecipeError(f"stitch.pairs: {err}") from None
    _choice(cfg.flow.timesteps, ("shared", "independent"), "flow.timesteps")
    _choice(cfg.flow.density, ("uniform", "logit_normal"), "flow.density")
    _choice(cfg.flow.balance, ("none", "ema"), "flow.balance")
    if not 0 < cfg.flow.balance_momentum < 1:
        raise RecipeError(f"flow.balance_momentum: expected a value in (0, 1), got {cfg.flow.balance_momentum}")
    _validate_tasks(cfg)
    d = cfg.data
    _choice(d.kind, ("synthetic", "latents"), "data.kind")
    if d.kind == "latents":
        if d.path is None:
            raise RecipeError("data.path: 'latents' data needs the folder of a latent cache (see `soe encode`)")
        if check_paths and not Path(d.path).is_dir():
            raise RecipeError(f"data.path: latent cache folder not found: '{d.path}'")
    if d.num_workers < 0:
        raise RecipeError(f"data.num_workers: expected >= 0 loader processes (0 = load in the training process), got {d.num_workers}")
    for k in ("batch_size", "num_clips"):
        if d[k] < 1:
            raise RecipeError(f"data.{k}: expected a positive integer, got {d[k]}")
    if not d.seconds > 0:
        raise RecipeError(f"data.seconds: expected a positive clip length in seconds, got {d.seconds}")
    o = cfg.optim
    if not o.lr > 0:
        raise RecipeError(f"optim.lr: expected a positive learning rate, got {o.lr}")
    if o.weight_decay < 0:
        raise RecipeError(f"optim.weight_decay: expected >= 0, got {o.weight_decay}")
    if o.warmup_steps < 0:
        raise RecipeError(f"optim.warmup_steps: expected >= 0, got {o.warmup_steps}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise RecipeError(f"optim.betas: expected two values in [0, 1), got {list(o.betas)}")
    _choice(o.schedule, ("constant", "cosine"), "optim.schedule")
    t = cfg.trainer
    if t.max_steps < 1:
        raise RecipeError(f"trainer.max_steps: expected a positive number of steps, got {t.max_steps}")
    for k in ("accumulate_grad_batches", "log_every_n_steps", "checkpoint_every_n_steps", "num_nodes"):
        if t[k] < 1:
            raise RecipeError(f"trainer.{k}: expected a positive integer, got {t[k]}")
    if t.threads is not None and t.threads < 1:
        raise RecipeError(f"trainer.threads: expected a positive number of CPU threads (or null for soe's choice), got {t.threads}")
    _choice(t.on_nonfinite, ("stop", "skip"), "trainer.on_nonfinite")
    validate_sample(cfg, check_paths)


def validate_sample(cfg: DictConfig, check_paths: bool = True) -> None:
    s = cfg.sample
    _choice(s.scheduler, ("unipc", "euler"), "sample.scheduler")
    _choice(s.decode, ("codec", "synthetic_preview"), "sample.decode")
    _choice(s.given_uncond, ("keep", "zeros"), "sample.given_uncond")
    given = [k for k in ("image", "video", "audio", "extend") if s[k] is not None]
    if len(given) > 1:
        raise RecipeError(f"sample.{given[1]}: give one conditioning input at a time, got {' and '.join(k + '=' for k in given)}")
    for k in ("steps", "num_samples"):
        if s[k] < 1:
            raise RecipeError(f"sample.{k}: expected a positive integer, got {s[k]}")
    if s.seconds is not None and not s.seconds > 0:
        raise RecipeError(f"sample.seconds: expected a positive duration in seconds, got {s.seconds}")
    if s.sync_clips < 0:
        raise RecipeError(f"sample.sync_clips: expected >= 0 held-out clips (0 = off), got {s.sync_clips}")
    if s.every_n_steps < 0:
        raise RecipeError(f"sample.every_n_steps: expected >= 0 (0 = never), got {s.every_n_steps}")
    try:
        speed_spec(s)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    for key in ("guidance", "shift"):
        for side, value in s[key].items():
            if side not in ("a", "b"):
                raise RecipeError(f"sample.{key}.{side}: expected keys 'a' and 'b' (the two experts)")
            if value is not None and not value > 0:
                raise RecipeError(f"sample.{key}.{side}: expected a positive number, got {value}")
    if s.out is not None:
        for p in (Path(s.out), *Path(s.out).parents):
            if p.exists() and not p.is_dir():
                raise RecipeError(f"sample.out: '{p}' is a file, expected a folder for the samples ('{s.out}')")
    if check_paths:
        for key in ("ckpt", "conditions", "image", "video", "audio", "extend"):
            if s[key] is not None and not Path(s[key]).exists():
                raise RecipeError(f"sample.{key}: not found: '{s[key]}'")
        for side in ("a", "b"):
            for key in ("codec_path", "text_encoder_path"):
                p = cfg.experts[side][key]
                if p is not None and not Path(p).is_dir():
                    raise RecipeError(f"experts.{side}.{key}: folder not found: '{p}'")


def _validate_tasks(cfg: DictConfig) -> None:
    """``flow.tasks`` names tasks the experts' modalities can serve, with weights >= 0 summing to > 0."""
    from soe.conditioning import TaskError, check_task
    from soe.registry import get_expert

    modalities = {side: get_expert(cfg.experts[side].name).modality for side in ("a", "b")}
    tasks = cfg.flow.tasks or {"joint": 1.0}
    for name, weight in tasks.items():
        try:
            check_task(name, modalities)
        except TaskError as err:
            raise RecipeError(str(err)) from None
        if not weight >= 0:
            raise RecipeError(f"flow.tasks.{name}: expected a weight >= 0, got {weight}")
    if not sum(tasks.values()) > 0:
        raise RecipeError("flow.tasks: the weights sum to 0; give at least one task a positive weight")
    for key, task in (("image", "image"), ("video", "v2a"), ("audio", "a2v"), ("extend", "extend")):
        if cfg.sample[key] is not None:
            try:
                check_task(task, modalities, key=f"sample.{key}")
            except TaskError as err:
                raise RecipeError(f"{err} (sample.{key} asks for task '{task}')") from None
    for key in ("flow", "sample"):
        v = cfg[key].extend_seconds
        if v is not None and not v > 0:
            raise RecipeError(f"{key}.extend_seconds: expected a positive number of seconds, got {v}")


def _validate_fusion(s, blocks) -> tuple[int, int]:
    """``stitch.depth`` and ``stitch.inject``; returns the depths the block pairs index (after expansion)."""
    from soe.depth import DepthSpec, insertion_points
    from soe.inject_spec import InjectSpec

    try:
        depth = DepthSpec(**OmegaConf.to_container(s.depth))
        for direction, spec in s.inject.items():
            if direction not in ("a_to_b", "b_to_a"):
                raise ValueError(f"inject.{direction}: expected a direction a_to_b or b_to_a")
            if s.direction not in (direction, "both"):
                raise ValueError(f"inject.{direction}: stitch.direction is {s.direction!r}, so there is no such connector")
            InjectSpec(**OmegaConf.to_container(spec))
        na, nb = blocks["a"], blocks["b"]
        if depth.mode == "insert_interpolated" and na != nb:
            insertion_points(min(na, nb), max(na, nb), depth.every)
            na = nb = max(na, nb)
    except ValueError as err:
        raise RecipeError(f"stitch.{err}") from None
    return na, nb


def _num_blocks(cls, e) -> int:
    """Depth of an expert without building it at full size: the checkpoint's config.json when the
    folder is there, else the preset (plus ``architecture``) built on the meta device."""
    import json

    import torch

    cfg_file = _find_config_json(Path(e.path)) if e.path is not None else None
    if cfg_file is not None:
        try:
            conf = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RecipeError(f"experts: '{cfg_file}' is not valid JSON ({err})") from None
        for k in ("num_layers", "num_hidden_layers", "num_layers_transformer"):
            if k in conf:
                return int(conf[k])
        if e.preset is None:
            raise RecipeError(f"experts: '{cfg_file}' names no layer count; also give 'preset'")
    if e.preset is None:
        raise RecipeError(f"experts: cannot read the depth of '{e.path}' without a config.json; also give 'preset'")
    with torch.device("meta"):
        return cls.from_preset(e.preset, device="meta", **dict(e.architecture), **dict(e.options)).num_blocks


def _max_seconds(cls, e) -> float | None:
    """The expert's clip-length limit, from its preset built on the meta device (None when unknown)."""
    import torch

    if e.preset is None:
        return None
    try:
        with torch.device("meta"):
            return cls.from_preset(e.preset, device="meta", **dict(e.architecture), **dict(e.options)).max_seconds()
    except (TypeError, ValueError):  # reported by the depth check with the key at fault
        return None


def _names_model_key(err: Exception, e) -> bool:
    return any(f"'{k}'" in str(err) for k in e.architecture)


def _find_config_json(path: Path):
    for p in (path / "transformer" / "config.json", path / "ace_step_transformer" / "config.json", path / "config.json"):
        if p.is_file():
            return p
    return None


def to_container(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def speed_spec(s):
    """``sample`` section -> ``soe.speed.SpeedSpec`` (raises ValueError naming the key)."""
    from soe.speed import SpeedSpec

    return SpeedSpec(memory=s.memory, storage_dtype=s.storage_dtype, compile=s.compile, attention_backend=s.attention_backend,
                     cache=s.cache, cache_threshold=s.cache_threshold)
