"""Recipe -> the objects every command shares: the experts (real weights, presets, stand-ins), the
Stitcher, each expert's codec and text encoder, and the sampler settings. What only training needs is
built by :mod:`soe.train.build` (what trains, objective, Trainer) and :mod:`soe.data.build` (data).

Each section is first built as its option dataclass (:mod:`soe.schema`, checked in ``__post_init__``);
the classes below take those dataclasses or plain arguments, never the recipe.
"""
from __future__ import annotations

import dataclasses

from omegaconf import DictConfig

from soe.errors import CheckpointError, CheckpointNotFoundError, SoeError, one_line, without_loader_advice
from soe.plugin.expert import Expert
from soe.plugin.registry import get_expert
from soe.recipe.hub_paths import local_weights
from soe.schema import ExpertConfig, Recipe, RecipeError, SampleConfig, SamplerConfig, StitchConfig, build
from soe.stitch.stitcher import Stitcher


def recipe_options(cfg: DictConfig) -> Recipe:
    """The whole recipe as its dataclasses (every option's own checks run)."""
    return build(Recipe, cfg)


# ---- experts and the Stitcher --------------------------------------------------------------------
def build_expert(cfg: DictConfig, side: str, device=None, load_weights: bool = True) -> Expert:
    """One expert of the recipe: real weights from ``path`` (a folder or a Hub repo id), else random weights of ``preset``.

    ``load_weights=False`` (meta-device inspection) builds the preset architecture only.
    """
    return build_expert_with_weights(cfg, side, device, load_weights)[0]


def build_stand_in(cfg: DictConfig, side: str) -> Expert | None:
    """The preset expert of ``side`` over its family's shape-only stand-in (``Expert.stand_in``), for
    ``soe inspect``; None when the family has none or the section does not build one (an unknown name,
    preset or option: building the real expert then reports it as usual). A stand-in has the model's
    modules inside the blocks only, so a LoRA with its own ``targets`` (which may name modules outside
    them) or from a file (``init_from``: the file names its modules) is counted on the real model."""
    try:
        e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
        cls = get_expert(e.name)
        if e.preset not in cls.presets or (e.train == "lora" and (e.lora.targets is not None or e.lora.init_from is not None)):
            return None
        return cls.stand_in({**cls.presets[e.preset], **e.architecture, **e.options})
    except Exception:
        return None


def build_expert_with_weights(cfg: DictConfig, side: str, device=None, load_weights: bool = True, empty: bool = False):
    """``(expert, weights)``; with ``empty`` (FSDP2) an expert from ``path`` whose family offers
    ``load_empty`` has its parameters on the meta device and ``weights`` reads its files lazily."""
    e: ExpertConfig = build(ExpertConfig, cfg.experts[side], f"experts.{side}")
    cls = get_expert(e.name)
    from_path = e.path is not None and load_weights
    weights = None
    empty = empty and cls.load_empty.__func__ is not Expert.load_empty.__func__  # the family can load lazily
    path = local_weights(e, side, "path") if from_path else None  # a Hub repo id: its snapshot's folder
    try:
        if from_path and empty:
            expert, weights = cls.load_empty(path, dtype=e.dtype.torch, **e.options)
        elif from_path:
            expert = cls.load(path, dtype=e.dtype.torch, device=device, **e.options)
        else:
            expert = cls.from_preset(e.preset, device=device, dtype=e.dtype.torch, **e.architecture, **e.options)
    except Exception as err:
        if isinstance(err, SoeError) and not (from_path and isinstance(err, CheckpointNotFoundError)):
            raise  # a missing checkpoint is reported below, under its recipe key
        if isinstance(err, TypeError) and (not from_path or "argument" in str(err)):  # an option the expert or model does not take
            model_key = not from_path and any(f"'{k}'" in str(err) for k in e.architecture)
            raise RecipeError(f"experts.{side}.{'architecture' if model_key else 'options'}: {err}") from None
        if not from_path:
            raise
        # missing/truncated files, wrong shapes, dtypes or keys, another family's config: one line naming the key
        raise CheckpointError(f"experts.{side}.path: cannot load '{e.path}' as expert '{e.name}': "
                              f"{one_line(without_loader_advice(err), 300)}") from None
    if e.gradient_checkpointing:
        expert.set_gradient_checkpointing(True)
    return expert, weights


def build_stitcher(cfg: DictConfig, device=None, load_weights: bool = True, experts: dict | None = None,
                   auto_pairs=None) -> Stitcher:
    """Both experts (``experts``: already built ones to reuse, e.g. what ``validate_recipe`` built on
    the meta device) joined as ``stitch`` says.

    ``stitch.pairs: auto`` needs ``auto_pairs(a, b) -> pairs`` (``soe.data.auto_pairs.pair_chooser``: the experts
    run on the recipe's clips); without it (shape-only builds: validation, ``soe inspect`` on meta) the
    placeholder is the first ``stitch.auto.connectors`` pairs of the linear map, same shapes and count."""
    a, b = ((experts or {}).get(side) or build_expert(cfg, side, device, load_weights) for side in ("a", "b"))
    s: StitchConfig = build(StitchConfig, cfg.stitch, "stitch")
    pairs = s.pairs
    if isinstance(pairs, str) and pairs == "auto":
        pairs = auto_pairs(a, b) if auto_pairs is not None else placeholder_auto_pairs(s, a.num_blocks, b.num_blocks)
    try:
        return Stitcher(a, b, pairs=pairs, direction=s.direction, detach_source=s.detach_source, connector=s.connector,
                        engine=s.engine, device=device, depth=s.depth, inject=s.inject)
    except RecipeError:
        raise
    except ValueError as err:  # a tap point, attention module or copy_from the experts do not have
        raise RecipeError(f"stitch.{err}") from None


def auto_connectors(s: StitchConfig, n_a: int, n_b: int) -> int:
    """How many pairs ``pairs: auto`` chooses (``stitch.auto.connectors``; null = the shallower depth)."""
    count = s.auto.connectors if s.auto.connectors is not None else min(n_a, n_b)
    if count > min(n_a, n_b):
        raise RecipeError(f"stitch.auto.connectors: expected at most {min(n_a, n_b)} pairs (the shallower expert's depth), got {count}")
    return count


def placeholder_auto_pairs(s: StitchConfig, n_a: int, n_b: int) -> list[tuple[int, int]]:
    """Shape-only stand-in for ``pairs: auto``: ``stitch.auto.connectors`` pairs of the linear map, evenly picked."""
    from soe.stitch.align import linear_pairs

    lin, count = linear_pairs(n_a, n_b), auto_connectors(s, n_a, n_b)
    return [lin[(k + 1) * len(lin) // count - 1] for k in range(count)]


def build_codec(cfg: DictConfig, side: str, expert: Expert, device=None):
    """``experts.<side>.codec_path`` -> the expert's latent codec (its family's tiny random codec without a path)."""
    try:
        codec = expert.codec(local_weights(cfg.experts[side], side, "codec_path"))
    except NotImplementedError as err:
        raise RecipeError(f"experts.{side}.codec_path: {err}") from None
    return codec.to(device) if device is not None else codec


def build_text_encoder(cfg: DictConfig, side: str, expert: Expert, device=None):
    """``experts.<side>.text_encoder_path`` -> the expert's own text encoder (prompts -> its conditioning)."""
    path = cfg.experts[side].text_encoder_path
    folder = local_weights(cfg.experts[side], side, "text_encoder_path")  # a Hub repo id: its snapshot's folder
    try:
        return expert.text_encoder(folder, device=device)
    except NotImplementedError as err:
        raise RecipeError(f"experts.{side}.text_encoder_path: {err}") from None
    except (OSError, ValueError) as err:  # missing files, another model's encoder, a width the expert cannot take
        raise RecipeError(f"experts.{side}.text_encoder_path: cannot use '{path}' for expert '{expert.name}': "
                          f"{one_line(err, 300)}") from None






# ---- sampling ------------------------------------------------------------------------------------
def build_sample(cfg: DictConfig) -> SampleConfig:
    """The ``sample`` section: a SamplerConfig (for ``soe.sample.sampler``) and a SpeedConfig (for ``soe.sample.speed``) in one."""
    return build(SampleConfig, cfg.sample, "sample")


def build_sampler(cfg: DictConfig, seed_offset: int = 0) -> SamplerConfig:
    """What the joint sampler takes from ``sample``; ``seed_offset`` shifts the seed (samples during training)."""
    s = build_sample(cfg)
    batched = s.cfg_batched if s.cfg_batched is not None else s.memory == "none"  # auto: offloading asks for the lower peak
    if cfg.get("parallel") is not None and cfg.parallel.get("cfg"):
        batched = True  # parallel.cfg splits the batched call's halves across ranks (each holds one half already)
    return SamplerConfig(**{f.name: getattr(s, f.name) for f in dataclasses.fields(SamplerConfig)}
                         | {"seed": s.seed + seed_offset, "cfg_batched": batched})

