"""Hugging Face Hub repo ids wherever soe takes a weight folder: ``org/name[@revision][:subfolder]``.

Every weight key of a recipe (``experts.<side>.path``, ``codec_path``, ``text_encoder_path``,
``lora.init_from``) and ``soe convert``'s SRC accept a Hub repo id as diffusers' ``from_pretrained``
does. :func:`resolve` turns one into the local folder of the repo's snapshot through huggingface_hub's
``snapshot_download`` (the cache users already have, ``HF_HOME`` / ``HF_HUB_CACHE``), fetching only the
files ``allow_patterns`` name (an expert declares them per key in ``Expert.hub_files``, so a Wan
transformer download does not fetch the umT5-XXL text encoder). An existing local path always wins, as in
diffusers. Offline (``HF_HUB_OFFLINE=1``, or no connection) a cached snapshot is used; an uncached repo is
one line naming the key, the repo and the env var (:class:`HubError`, exit status 2).

Hand-written, not huggingface_hub's own defaults, in two places: the cache folder and the offline switch
are read from the environment at each call (huggingface_hub reads them once, at import), so a process
that set ``HF_HOME`` after importing diffusers still gets what it asked for; and the library's many error
types become one line each.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from soe.errors import SoeError, one_line

# org/name as the Hub spells repo ids (letters, digits, - _ .), then @revision (branch, tag or commit;
# may hold '/', e.g. refs/pr/1) and :subfolder. Never a path that starts with / . ~ or holds a backslash.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^:@\s]+))?(?::(?P<subfolder>[^:@\s]+))?$")
OFFLINE_ENV = "HF_HUB_OFFLINE"


class HubError(SoeError, FileNotFoundError):
    """A Hub repo id that cannot become a local folder: not cached offline, not found, gated, no connection."""


@dataclass(frozen=True)
class HubRef:
    """A parsed ``org/name[@revision][:subfolder]``."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.subfolder}" if self.subfolder else "")


def parse_hub_id(value) -> HubRef | None:
    """The Hub reference ``value`` names, or None for a local path (an existing one always is local)."""
    if value is None or not isinstance(value, (str, os.PathLike)):
        return None
    text = os.fspath(value)
    if not text or text.startswith(("/", ".", "~")) or "\\" in text or Path(text).exists():
        return None
    m = _HUB_ID.match(text)
    if m is None or ".." in m.group("repo") or (m.group("subfolder") and ".." in Path(m.group("subfolder")).parts):
        return None
    sub = m.group("subfolder")
    return HubRef(m.group("repo"), m.group("revision"), sub.strip("/") if sub else None)


def is_hub_id(value) -> bool:
    return parse_hub_id(value) is not None


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/true/yes/on), read now rather than at import."""
    return os.environ.get(OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    """The Hub cache folder: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def cached_commit(ref: HubRef) -> str | None:
    """The commit ``ref``'s revision points at in the local cache (``refs/<revision>``), None when not cached;
    reads one small file, no network, no huggingface_hub import (``soe inspect``'s start-up cache keys on it)."""
    revision = ref.revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    refs = Path(cache_dir()) / f"models--{ref.repo_id.replace('/', '--')}" / "refs" / revision
    try:
        return refs.read_text().strip()
    except OSError:
        return None


def resolve(value, key: str, allow_patterns=None) -> str:
    """``value`` unchanged when it is a local path (or None); else the local folder of the Hub repo it
    names (its ``:subfolder`` inside the snapshot), downloaded or found in the cache.

    ``allow_patterns``: the files to fetch, relative to the folder ``value`` names (so under its subfolder);
    None fetches the whole folder. ``key`` names the recipe key or argument in error messages.
    """
    ref = parse_hub_id(value)
    if ref is None:
        return value
    patterns = None if allow_patterns is None else tuple(allow_patterns)
    if ref.subfolder:  # the expert's patterns are relative to the folder it is given: under the subfolder
        patterns = tuple(f"{ref.subfolder}/{p}" for p in patterns) if patterns else (f"{ref.subfolder}/*",)
    root = _snapshot(ref.repo_id, ref.revision, patterns, cache_dir(), offline(), key, str(ref))
    folder = Path(root) / ref.subfolder if ref.subfolder else Path(root)
    if not folder.exists():
        raise HubError(f"{key}: Hub repo '{ref.repo_id}' has no folder '{ref.subfolder}' (at revision "
                       f"{ref.revision or 'main'}); expected '{ref.repo_id}:SUBFOLDER' with a folder of the repo")
    return str(folder)


@functools.lru_cache(maxsize=64)
def _snapshot(repo_id, revision, patterns, cache, is_offline, key, shown) -> str:
    """One ``snapshot_download`` per (repo, revision, files, cache, offline) in a process: a recipe's key
    is resolved by validation and again by the builders, a single network round trip."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns) if patterns else None,
                                 cache_dir=cache, local_files_only=is_offline)
    except GatedRepoError:
        raise HubError(f"{key}: Hub repo '{repo_id}' is gated: accept its terms on huggingface.co and log in "
                       "(`hf auth login`, or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{key}: Hub repo '{repo_id}' has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise HubError(f"{key}: Hub repo '{repo_id}' not found (nor a local folder '{shown}'); private repos need "
                       "`hf auth login` or HF_TOKEN") from None
    except LocalEntryNotFoundError as err:
        if hasattr(err, "snapshot_path"):  # IncompleteSnapshotError: cached, but files the key needs are missing
            raise HubError(f"{key}: Hub repo '{shown}' is only partly in the Hugging Face cache ({cache}): files this key "
                           f"needs are missing and cannot be downloaded ({'HF_HUB_OFFLINE=1' if is_offline else 'no connection'}); "
                           f"download them with network access (unset {OFFLINE_ENV})") from None
        if is_offline:
            raise HubError(f"{key}: '{shown}' is no local folder, and as a Hub repo it is not in the Hugging Face cache ({cache}) and {OFFLINE_ENV}=1 "
                           f"forbids downloading it; download it once with network access (unset {OFFLINE_ENV}), or point "
                           "HF_HOME at a cache that has it") from None
        raise HubError(f"{key}: '{shown}' is no local folder, and as a Hub repo it could not be downloaded (no connection to the Hub?) nor found in the "
                       f"Hugging Face cache ({cache}); connect, or point HF_HOME at a cache that has it and set "
                       f"{OFFLINE_ENV}=1") from None
    except (OSError, ValueError) as err:  # HTTP errors, a cache folder that cannot be written, a malformed id
        raise HubError(f"{key}: Hub repo '{shown}': {one_line(err, 200)}") from None
