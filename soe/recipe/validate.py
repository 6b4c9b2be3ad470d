"""``validate_recipe``: every check of a recipe before anything is built at full size.

First each option dataclass's own checks (``__post_init__``, see :mod:`soe.schema`), then what no
single section can know: expert names and presets in the registry, folders on disk (a Hub repo id: its
snapshot, fetched or from the cache, see :mod:`soe.recipe.hub_paths`), each expert's
depth (from its checkpoint's config.json, else its preset built on the meta device), block pairs
and inserted blocks in range, clip lengths the experts can position, tasks their modalities serve.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from soe.hub import HubError, resolve
from soe.recipe.hub_paths import local_weights
from soe.schema import Recipe, RecipeError, build
from soe.schema.sample import GIVEN_MEDIA


def validate_recipe(cfg: DictConfig, check_paths: bool = True, experts: dict | None = None,
                    data_path_is_output: bool = False) -> dict:
    """Raise a one-line RecipeError for the first problem. ``check_paths=False`` for meta-device inspection.

    Returns the experts built on the meta device to learn their depth (``{side: Expert | None}``,
    None where the checkpoint's config.json told): ``build_stitcher(cfg, device="meta",
    load_weights=False, experts=...)`` reuses them, so ``soe inspect`` builds each expert once.
    ``experts`` given here (built the same way) are used instead of building them.
    ``data_path_is_output``: ``soe encode`` writes the cache at ``data.path``, whatever ``data.kind`` says.
    """
    from soe.lora.adapters import LORA_HUB_FILES
    from soe.plugin.registry import UnknownExpertError, get_expert

    recipe = build(Recipe, cfg)  # each option's own checks, errors under their full key
    built, blocks = dict(experts or {}), {}
    for side in ("a", "b"):
        e, key = recipe.experts.a if side == "a" else recipe.experts.b, f"experts.{side}"
        try:
            cls = get_expert(e.name)
        except UnknownExpertError as err:
            raise RecipeError(f"{key}.name: {err}") from None
        _check_expert_keys(e, cls, key)
        if e.preset is None and e.path is None:
            raise RecipeError(f"{key}: give 'preset' (random weights of a known architecture) or 'path' (a checkpoint folder)")
        if e.preset is not None and e.preset not in cls.presets:
            raise RecipeError(f"{key}.preset: expert '{e.name}' has no preset '{e.preset}'; expected one of {sorted(cls.presets)}")
        try:
            path = local_weights(e, side, "path", config_only=not check_paths)  # a Hub repo id: its local snapshot
        except HubError:
            if check_paths or e.preset is None:
                raise
            path = None  # inspection without the weights: the preset's architecture, as for a missing local folder
        if check_paths and path is not None and not Path(path).is_dir():
            raise RecipeError(f"{key}.path: checkpoint folder not found: '{e.path}'")
        if e.storage_dtype is not None and recipe.trainer.strategy == "fsdp2":
            raise RecipeError(f"{key}.storage_dtype: fp8 storage runs with strategy ddp/auto on one or more GPUs, "
                              f"not '{recipe.trainer.strategy}' (sharding wants one dtype per flat parameter)")
        if check_paths and e.train == "lora" and e.lora.init_from is not None and not Path(
                resolve(e.lora.init_from, f"{key}.lora.init_from", LORA_HUB_FILES)).exists():
            raise RecipeError(f"{key}.lora.init_from: LoRA file or folder not found: '{e.lora.init_from}'")
        depth = _depth_from_config_json(e, path)
        if built.get(side) is None and e.preset is not None:
            try:
                built[side] = _on_meta(cfg, side)
            except (RecipeError, TypeError, ValueError):
                if depth is None:
                    raise
                built[side] = None  # the checkpoint folder's own config.json decides
        built.setdefault(side, None)
        blocks[side] = depth if depth is not None else built[side].num_blocks
        longest = built[side].max_seconds() if built[side] is not None else None
        for skey, secs in (("data.seconds", recipe.data.seconds), ("sample.seconds", recipe.sample.seconds)):
            if longest is not None and secs is not None and secs > longest:
                raise RecipeError(f"{skey}: {secs} s is longer than expert {side} ('{e.name}') can position "
                                  f"(at most {longest:.1f} s with this architecture)")
            rate = built[side].latent_rate if built[side] is not None else None
            if rate and secs is not None and secs * rate < 1 - 1e-6:
                raise RecipeError(f"{skey}: {secs} s is shorter than one latent frame of expert {side} ('{e.name}'): "
                                  f"expected at least {1 / rate:.3g} s")
        if blocks[side] < 1:
            which = next((f"{key}.architecture.{k}" for k in e.architecture if "layers" in k), f"{key}.architecture")
            raise RecipeError(f"{which}: expert '{e.name}' would have {blocks[side]} blocks; expected at least one")
    _check_depths(recipe, blocks)
    _check_tasks(recipe)
    d = recipe.data
    from soe.schema.train import is_url

    if d.kind == "synthetic" and d.path is not None and not data_path_is_output:
        raise RecipeError(f"data.path: '{d.path}' has no effect with data.kind 'synthetic' (clips are drawn, not read); "
                          "set data.kind=latents to train on that cache, or remove data.path")
    if check_paths and d.kind == "latents" and not is_url(d.path) and not Path(d.path).is_dir():
        raise RecipeError(f"data.path: latent cache folder not found: '{d.path}'")
    _check_sample_paths(recipe, check_paths)
    return built


def _check_expert_keys(e, cls, key: str) -> None:
    """``options`` and ``architecture`` are free-form mappings: each key must be one the expert (its
    constructor) or its model (its config) takes, else the closest valid key is suggested."""
    from soe.schema.base import closest

    options, model = cls.option_names(), cls.architecture_names()
    for section, given, allowed in (("options", e.options, options),
                                    ("architecture", e.architecture, None if model is None else [*model, *(options or [])])):
        for name in given:
            if allowed is not None and name not in allowed:
                what = "an option of expert" if section == "options" else "a model-config key of expert"
                raise RecipeError(f"{key}.{section}.{name}: not {what} '{e.name}'{closest(name, allowed)}; "
                                  f"expected one of {sorted(allowed)}")


def block_pairs(cfg) -> list[tuple[int, int]]:
    """The recipe's block pairs ``(block of a, block of b)``, after depth expansion, from each expert's depth as
    validation reads it (its checkpoint's config.json, else its preset on the meta device); nothing is loaded."""
    from soe.stitch.align import resolve_depth_map

    built = validate_recipe(cfg, check_paths=False)
    recipe = build(Recipe, cfg)
    depths = []
    for side in ("a", "b"):
        e = getattr(recipe.experts, side)
        depth = _depth_from_config_json(e, local_weights(e, side, "path", config_only=True))
        depths.append(depth if depth is not None else built[side].num_blocks)
    if recipe.stitch.depth.mode == "insert_interpolated":
        depths = [max(depths)] * 2
    return resolve_depth_map(recipe.stitch.pairs, *depths)


def _on_meta(cfg, side: str):
    """The preset (with ``architecture`` and ``options``) built on the meta device: shapes, no memory."""
    import torch

    from soe.recipe.builders import build_expert

    with torch.device("meta"):
        return build_expert(cfg, side, device="meta", load_weights=False)


def _depth_from_config_json(e, path) -> int | None:
    """The layer count in a checkpoint folder's config.json (None without one, or without a folder);
    ``path``: ``e.path`` as a local folder (a Hub repo id resolved)."""
    cfg_file = _find_config_json(Path(path)) if path is not None else None
    if cfg_file is None:
        if e.preset is None:
            raise RecipeError(f"experts: cannot read the depth of '{e.path}' without a config.json; also give 'preset'")
        return None
    try:
        conf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"experts: '{cfg_file}' is not valid JSON ({err})") from None
    for k in ("num_layers", "num_hidden_layers", "num_layers_transformer"):
        if k in conf:
            return int(conf[k])
    if e.preset is None:
        raise RecipeError(f"experts: '{cfg_file}' names no layer count; also give 'preset'")
    return None


def _find_config_json(path: Path):
    for p in (path / "transformer" / "config.json", path / "ace_step_transformer" / "config.json", path / "config.json"):
        if p.is_file():
            return p
    return None


def _check_depths(recipe: Recipe, blocks: dict) -> None:
    """Inserted blocks (``stitch.depth``) and block pairs (``stitch.pairs``) fit the experts' depths."""
    from soe.stitch.align import DepthMapError, resolve_depth_map
    from soe.stitch.depth import insertion_points

    s, na, nb = recipe.stitch, blocks["a"], blocks["b"]
    if s.depth.mode == "insert_interpolated" and na != nb:
        try:
            insertion_points(min(na, nb), max(na, nb), s.depth.every)
        except ValueError as err:
            raise RecipeError(f"stitch.{err}") from None
        na = nb = max(na, nb)
    if isinstance(s.pairs, str) and s.pairs == "auto":  # chosen later from the experts; only the count is checked here
        from soe.recipe.builders import auto_connectors

        auto_connectors(s, na, nb)
        return
    try:
        resolve_depth_map(s.pairs, na, nb)
    except DepthMapError as err:
        raise RecipeError(f"stitch.pairs: {err}") from None


def _check_tasks(recipe: Recipe) -> None:
    """``flow.tasks`` and the ``sample`` conditioning input name tasks the experts' modalities can serve."""
    from soe.flow.conditioning import TaskError, check_task
    from soe.plugin.registry import get_expert

    modalities = {side: get_expert(getattr(recipe.experts, side).name).modality for side in ("a", "b")}
    direction = str(recipe.stitch.direction)
    for name, weight in (recipe.flow.tasks or {"joint": 1.0}).items():
        try:
            check_task(name, modalities, direction=direction if weight > 0 else "both")  # weight 0: never drawn
        except TaskError as err:
            raise RecipeError(str(err)) from None
    for key, task in GIVEN_MEDIA.items():
        if getattr(recipe.sample, key) is not None:
            try:
                check_task(task, modalities, key=f"sample.{key}", direction=direction)
            except TaskError as err:
                raise RecipeError(f"{err} (sample.{key} asks for task '{task}')") from None


def _check_sample_paths(recipe: Recipe, check_paths: bool) -> None:
    s = recipe.sample
    if s.out is not None:
        for p in (Path(s.out), *Path(s.out).parents):
            if p.exists() and not p.is_dir():
                raise RecipeError(f"sample.out: '{p}' is a file, expected a folder for the samples ('{s.out}')")
    if not check_paths:
        return
    for key in ("ckpt", "conditions", "image", "video", "audio", "extend"):
        if getattr(s, key) is not None and not Path(getattr(s, key)).exists():
            raise RecipeError(f"sample.{key}: not found: '{getattr(s, key)}'")
    if s.ckpt is not None and not Path(s.ckpt).is_dir():
        raise RecipeError(f"sample.ckpt: '{s.ckpt}' is a file, expected a run folder of `soe stitch` (or its trained/ folder)")
    for side in ("a", "b"):
        for key in ("codec_path", "text_encoder_path"):
            p = local_weights(getattr(recipe.experts, side), side, key)
            if p is not None and not Path(p).is_dir():
                raise RecipeError(f"experts.{side}.{key}: folder not found: '{getattr(getattr(recipe.experts, side), key)}'")

