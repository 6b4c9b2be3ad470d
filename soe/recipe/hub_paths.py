"""A recipe's weight keys that name Hub repos (``experts.<side>.path``, ``codec_path``, ``text_encoder_path``)
as local folders, fetching the files the expert declares for that key (``Expert.hub_files``).

The one place where recipe validation and the builders turn a weight key into a folder; the Hub itself
(parsing ``org/name[@revision][:subfolder]``, the cache, offline use, one-line errors) is :mod:`soe.hub`.
The recipe keeps the repo id as written (run folders, exports and model cards name the repo, not a cache path).
"""
from __future__ import annotations

from soe.hub import is_hub_id, resolve

WEIGHT_KEYS = ("path", "codec_path", "text_encoder_path")


def local_weights(section, side: str, key: str, config_only: bool = False) -> str | None:
    """The local folder of ``experts.<side>.<key>`` (``section``: that recipe section or its ExpertConfig):
    the value itself for a local path or None, else the Hub snapshot's folder. ``config_only`` fetches only
    the JSON files of the expert's patterns (what validation reads to learn a depth: ``soe inspect``)."""
    value = getattr(section, key)
    if value is None or not is_hub_id(value):
        return value
    from soe.plugin.registry import UnknownExpertError, get_expert

    try:
        patterns = get_expert(section.name).hub_files.get(key)
    except UnknownExpertError:
        patterns = None
    if config_only:
        patterns = tuple(p + ".json" if p.endswith("/*") else p for p in patterns if p.endswith(("/*", ".json"))) if patterns else ("*.json",)
    return resolve(value, f"experts.{side}.{key}", patterns)
