"""A streamed latent cache read from a URL: through litdata's downloaders into a local cache folder.

No network here: ``local:`` is litdata's own local "remote", and ``mock://`` a downloader registered
with litdata that serves a folder and records what it was asked for, so the test sees that meta,
indexes and chunks really travel through litdata's download path.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from litdata.streaming.downloader import Downloader, register_downloader, unregister_downloader

from soe.data.latent_cache import LatentCacheError
from soe.data.stream_read import StreamingCache
from soe.data.stream_synthetic import random_record, write_cache

SHAPES, TEXT = {"a": (2, 3, 4), "b": (4, 5)}, {"a": (6, 8), "b": (3, 4)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "cache"
    write_cache(folder, (random_record(i, SHAPES, TEXT, durations=(1.0, 2.0)) for i in range(11)), {"a": "x", "b": "y"}, shard_size=3)
    return folder


def every_window(c: StreamingCache) -> dict:
    out = {}
    for bucket in c.buckets:
        for i in range(sum(c.chunk_sizes(bucket))):
            w = c.window(bucket, i)
            out[w.pop("id")] = w
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) == 11
    for k in want:
        for side in ("a", "b"):
            assert got[k][side].keys() == want[k][side].keys()
            for name, t in want[k][side].items():
                assert torch.equal(got[k][side][name], t), (k, side, name)


def test_local_url_is_copied_into_the_cache_dir_and_reads_the_same(cache, tmp_path):
    local = every_window(StreamingCache(cache))
    c = StreamingCache(f"local:{cache}", cache_dir=tmp_path / "soe-cache")
    assert c.url == f"local:{cache}" and tmp_path / "soe-cache" in c.folder.parents
    assert_same(every_window(c), local)
    copied = sorted(p.relative_to(c.folder).as_posix() for p in c.folder.rglob("chunk-*.bin"))
    assert copied == sorted(p.relative_to(cache).as_posix() for p in cache.rglob("chunk-*.bin"))  # every chunk came through


class Served(Downloader):
    """``mock://store/<rel>`` -> ``Served.root/<rel>``; every request is recorded."""

    root: Path
    asked: list = []

    def download_file(self, remote_filepath: str, local_filepath: str) -> None:
        rel = remote_filepath.split("mock://store/", 1)[1]
        Served.asked.append(rel)
        Path(local_filepath).parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_download_path(local_filepath)
        shutil.copy(Served.root / rel, tmp)
        self._publish_file(tmp, local_filepath)

    async def adownload_fileobj(self, remote_filepath: str) -> bytes:
        rel = remote_filepath.split("mock://store/", 1)[1]
        Served.asked.append(rel)
        return (Served.root / rel).read_bytes()


@pytest.fixture
def served(cache):
    Served.root, Served.asked = cache, []
    register_downloader("mock://", Served, overwrite=True)
    yield Served
    unregister_downloader("mock://")


def test_a_registered_object_store_downloader_serves_meta_indexes_and_chunks(cache, served, tmp_path):
    c = StreamingCache("mock://store", cache_dir=tmp_path / "soe-cache")
    assert "meta.json" in served.asked and {f"windows/{b}/index.json" for b in c.buckets} <= set(served.asked)
    assert not any(a.endswith(".bin") for a in served.asked)  # chunks only when a batch needs them
    assert_same(every_window(c), every_window(StreamingCache(cache)))
    fetched = {a for a in served.asked if a.endswith(".bin")}
    assert fetched == {p.relative_to(cache).as_posix() for p in cache.rglob("chunk-*.bin")}


def test_a_missing_remote_cache_is_one_line(served, tmp_path):
    Served.root = tmp_path / "nothing"
    with pytest.raises(LatentCacheError, match=r"latent cache 'mock://store': 'meta.json' is missing") as err:
        StreamingCache("mock://store", cache_dir=tmp_path / "soe-cache")
    assert "\n" not in str(err.value)


def test_an_unknown_url_scheme_is_one_line_and_exit_2(tmp_path):
    with pytest.raises(LatentCacheError, match=r"no downloader for 'ftp://'"):
        StreamingCache("ftp://host/cache", cache_dir=tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nexperts:\n  a: {name: wan2.1, preset: tiny}\n  b: {name: ace-step-1.5, preset: tiny}\n"
                      "stitch: {pairs: linear}\ndata: {kind: latents, path: 'ftp://host/cache'}\n"
                      f"trainer: {{max_steps: 1, accelerator: cpu}}\nrun_dir: {tmp_path / 'run'}\n")
    out = subprocess.run([sys.executable, "-m", "soe", "stitch", str(recipe)], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "ftp://" in lines[0], out.stdout + out.stderr
    assert not (tmp_path / "run").exists()


def test_a_remote_cache_encoded_again_under_the_same_chunk_names_is_read_anew(cache, served, tmp_path):
    """The local copy keeps chunks only while the remote index lists them unchanged (size, items, sha1)."""
    local = tmp_path / "soe-cache"
    every_window(StreamingCache("mock://store", cache_dir=local))  # every chunk copied once
    again = tmp_path / "again"
    records = (random_record(i, SHAPES, TEXT, durations=(1.0, 2.0)) for i in range(11))
    write_cache(again, ({**r, "a": {**r["a"], "latents": -r["a"]["latents"]}} for r in records), {"a": "x", "b": "y"}, shard_size=3)
    assert sorted(p.name for p in again.rglob("chunk-*.bin")) == sorted(p.name for p in cache.rglob("chunk-*.bin"))
    Served.root, Served.asked = again, []
    got = every_window(StreamingCache("mock://store", cache_dir=local))
    assert_same(got, every_window(StreamingCache(again)))
    windows = {a for a in served.asked if a.startswith("windows/") and a.endswith(".bin")}
    assert windows == {p.relative_to(again).as_posix() for p in again.rglob("windows/*/chunk-*.bin")}  # changed: fetched again
    assert not any(a.startswith("texts/") and a.endswith(".bin") for a in served.asked)  # same text chunks: kept
