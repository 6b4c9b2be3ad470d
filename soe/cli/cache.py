"""A cache of what ``soe experts`` and ``soe inspect`` print, so that they answer in well under a second.

Both commands print facts derived from code: the registered expert classes, and models built on the
meta device. A first run is already quick (``soe experts`` reads the plugins' torch-free descriptions,
soe/plugin/listing.py; ``soe inspect`` builds shape-only stand-ins, soe/plugin/stand_in.py, and pays about the
1.5-3 s of ``import torch``); it stores its tables as JSON, and a later run with the same inputs
reads them back without importing torch at all.

The cache key holds everything the tables derive from: the command's inputs (the fully resolved
recipe, the ``config.json`` files its expert folders hold, the installed ``soe.experts`` entry points),
the source of soe and of every expert plugin involved (file contents, not dates), and the versions of
python, torch, diffusers, peft, timm and transformers. Change any of them and the tables are computed
again. Not cached: experts registered at run time (``@register_expert``, they have no source to
fingerprint), recipes with ``lora.init_from`` (the LoRA file decides the counts), ``--details``. An expert
path that is a Hub repo id keys on the commit its revision points at in the local Hugging Face cache.

The folder is ``$SOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/soe``, else ``~/.cache/soe``; ``--no-cache``
skips it. A folder that cannot be written, or a damaged file, only means the tables are computed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, entry_points, version
from importlib.util import find_spec
from pathlib import Path

from rich.table import Table

FORMAT = 1
KEEP = 64  # newest files kept; older ones are removed when a new one is written
LIBRARIES = ("torch", "diffusers", "peft", "timm", "transformers")
ENV_VAR = "SOE_CACHE_DIR"


def cache_dir() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "soe"


def _source_files(module: str) -> list[Path]:
    """The .py files of ``module``'s top-level package (or of the module alone), found without importing it."""
    spec = find_spec(module.split(".")[0])
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted((f for d in spec.submodule_search_locations for f in Path(d).rglob("*.py")), key=str)
    return [Path(spec.origin)] if spec.origin else []


def _versions(names) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def code_fingerprint(plugin_modules=()) -> dict:
    """What the tables' code is: source hashes of soe, its built-in experts and the given plugin modules' packages."""
    digest = hashlib.sha256()
    experts = find_spec("soe.experts")  # the built-in experts live outside soe/ in a development checkout
    files = [*_source_files("soe"), *sorted((Path(d) / f for d in (experts.submodule_search_locations or [])
                                             for f in os.listdir(d) if f.endswith(".py")), key=str)]
    for module in sorted({m.split(".")[0] for m in plugin_modules} - {"soe"}):
        files += _source_files(module)
    for f in files:
        digest.update(str(f).encode() + b"\0" + f.read_bytes() + b"\0")
    return {"python": sys.version, "libraries": _versions(LIBRARIES), "source": digest.hexdigest()}


def expert_entry_points(group: str = "soe.experts") -> dict[str, dict]:
    """The installed ``soe.experts`` (or ``soe.experts.info``) entry points: name -> target and providing distribution."""
    out = {}
    for ep in entry_points(group=group):
        dist = getattr(ep, "dist", None)
        out[ep.name] = {"value": ep.value, "dist": f"{dist.name} {dist.version}" if dist is not None else None}
    return out


def experts_key() -> str | None:
    """Key of ``soe experts``' table; None when classes registered at run time join the listing."""
    eps = expert_entry_points()
    if any(name not in eps or cls is not _loaded(eps, name) for name, cls in _runtime_registry().items()):
        return None
    return _hash({"command": "experts", "entry_points": eps, "info": expert_entry_points("soe.experts.info"),
                  "code": code_fingerprint(e["value"].split(":")[0] for e in eps.values())})


def recipe_key(cfg) -> str | None:
    """Key of ``soe inspect``'s tables for a loaded recipe; None when it cannot be cached (see the module doc)."""
    from omegaconf import OmegaConf

    from soe.recipe.validate import _find_config_json

    from soe.hub import cached_commit, parse_hub_id

    eps = expert_entry_points()
    sides = [cfg.experts[s] for s in ("a", "b")]
    registry = _runtime_registry()
    if any(e.name not in eps or registry.get(e.name) not in (None, _loaded(eps, e.name)) or e.lora.get("init_from")
           for e in sides):
        return None
    configs = {}
    for e in sides:
        ref = parse_hub_id(e.path)
        if ref is not None:  # a Hub repo id: the commit its revision points at in the local HF cache (a new download moves it)
            configs[str(ref)] = cached_commit(ref)
            continue
        found = _find_config_json(Path(e.path)) if e.path is not None else None
        if found is not None:
            configs[str(found)] = hashlib.sha256(found.read_bytes()).hexdigest()
    recipe = OmegaConf.to_container(cfg, resolve=True)
    plugins = [eps[e.name]["value"].split(":")[0] for e in sides]
    return _hash({"command": "inspect", "recipe": recipe, "config_json": configs,
                  "entry_points": {e.name: eps[e.name] for e in sides}, "code": code_fingerprint(plugins)})


def _runtime_registry() -> dict:
    """soe's registry of expert classes: empty unless soe.plugin.registry was imported (which imports torch)."""
    registry = sys.modules.get("soe.plugin.registry")
    return dict(registry._REGISTRY) if registry is not None else {}


def _loaded(eps, name):
    """The class the entry point ``name`` names, if its module is already imported (else None)."""
    module, _, attr = eps[name]["value"].partition(":")
    return getattr(sys.modules.get(module), attr, None)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def table_to_json(t: Table) -> dict | None:
    """A rich table of plain-text cells as JSON (None when a cell or title is not plain text)."""
    texts = [t.title, *(c.header for c in t.columns), *(x for c in t.columns for x in c.cells)]
    if not all(x is None or isinstance(x, str) for x in texts):
        return None
    return {"title": t.title, "columns": [{"header": c.header, "justify": c.justify, "no_wrap": c.no_wrap} for c in t.columns],
            "rows": [list(r) for r in zip(*(list(c.cells) for c in t.columns))]}


def table_from_json(d: dict) -> Table:
    t = Table(title=d["title"])
    for c in d["columns"]:
        t.add_column(c["header"], justify=c["justify"], no_wrap=c["no_wrap"])
    for row in d["rows"]:
        t.add_row(*row)
    return t


def load(key: str | None) -> list[Table] | None:
    if key is None:
        return None
    try:
        data = json.loads((cache_dir() / "cli" / f"{key}.json").read_text())
        if data.get("format") != FORMAT:
            return None
        return [table_from_json(d) for d in data["tables"]]
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: compute the tables again
        return None


def save(key: str | None, tables: list[Table]) -> None:
    if key is None:
        return
    data = [table_to_json(t) for t in tables]
    if any(d is None for d in data):
        return
    folder = cache_dir() / "cli"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"format": FORMAT, "tables": data}))
        os.replace(tmp, folder / f"{key}.json")  # readers see the whole file or none
        files = sorted(folder.glob("*.json"), key=lambda f: f.stat().st_mtime)
        for old in files[:-KEEP]:
            old.unlink(missing_ok=True)
    except OSError:  # read-only home, full disk: the command still printed its tables
        pass
