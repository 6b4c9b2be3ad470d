"""Recipes: find, read, merge ``key=value`` overrides onto the schema, and validate.

A recipe is one YAML file. ``load_recipe`` merges it and the overrides onto the schema
(:mod:`soe.schema`, the option dataclasses the code takes), so unknown keys, wrong types and names
outside a choice fail at once; ``validate_recipe`` (:mod:`soe.recipe.validate`) then runs each option
dataclass's own checks and what needs the experts or the disk (known expert names and presets,
existing folders, block pairs in range, ...). Every failure is a :class:`RecipeError` whose one-line
message names the key and what was expected.
"""
from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from soe.schema import SECTIONS, Recipe, RecipeError


def to_container(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


_ENUM_MESSAGE = re.compile(r"Invalid value '(.*)', expected one of \[(.*)\]$")


def _oc_error(e: Exception) -> RecipeError:
    key = getattr(e, "full_key", None) or "recipe"
    msg = (getattr(e, "msg", None) or str(e)).splitlines()[0]
    names = _ENUM_MESSAGE.match(msg)
    if names:  # a name outside a Choice: the same wording as every other "expected one of"
        msg = f"expected one of {names.group(2).split(', ')}, got {names.group(1)!r}"
    return RecipeError(f"{key}: {msg}")


def shipped_recipes() -> dict[str, Path]:
    """The recipes installed with soe (package data ``soe/recipes``), by name: ``{"demo": .../demo.yaml}``."""
    folder = Path(str(importlib.resources.files("soe.recipes")))  # a data folder: nothing of soe's code is imported
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def find_recipe(path) -> Path:
    """``path`` itself when it is a file, else a shipped recipe named ``path`` (``demo`` or ``demo.yaml``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise RecipeError(f"recipe: expected a YAML file path or the name of a shipped recipe (or the DictConfig that "
                          f"soe.recipe.reading.load_recipe returns), got a {type(path).__name__}")
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
    for section in SECTIONS:
        value = raw.get(section) if isinstance(raw, DictConfig) else None
        if value is not None and not isinstance(value, DictConfig):
            raise RecipeError(f"{section}: expected a mapping of keys, got {type(OmegaConf.to_object(value) if OmegaConf.is_config(value) else value).__name__}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), raw)
        for o in overrides:  # one at a time by path, so `targets.1.pre_norm=...` reaches into a list
            key, _, text = o.partition("=")
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]  # read as YAML
            OmegaConf.update(cfg, key, value, merge=True)
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
