"""Streaming latent cache: batch order, compact storage, lazy reading, bad shards, exact resume.

Caches here are written through ``PartWriter`` (what ``soe encode`` uses) from synthetic windows,
so no media is decoded; ``tests/test_encode.py`` covers encoding real clips, ``--shard`` included.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import finished_checkpoint
from rich.console import Console

from soe.data.latent_cache import LatentCacheError
from soe.data.stream_format import pack, pad, trim, unpack
from soe.data.stream_read import StreamingCache, load_cache
from soe.data.stream_synthetic import synthetic_record, write_cache
from soe.data.streaming import StreamBatchSampler, StreamingLatentDataModule
from soe.recipe.builders import build_expert
from soe.recipe.reading import load_recipe

ROOT = Path(__file__).parents[1]
QUIET = Console(file=open(os.devnull, "w"))
RECIPE = """\
name: stream-test
seed: 3
experts:
  a: {name: wan2.1, preset: tiny, train: lora, lora: {r: 2, alpha: 2, dropout: 0.2}}
  b: {name: ace-step-1.5, preset: tiny, train: lora, lora: {r: 2, alpha: 2, dropout: 0.2}}
stitch: {pairs: linear, direction: both}
data: {kind: latents, seconds: 1.0, batch_size: 2, shuffle_chunks: 2}
optim: {lr: 1.0e-2, warmup_steps: 3}
trainer: {max_steps: 4, accelerator: cpu, log_every_n_steps: 1, checkpoint_every_n_steps: 100}
"""
NAMES = {"a": "wan2.1", "b": "ace-step-1.5"}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(RECIPE)
    cfg = load_recipe(path)
    return {s: build_expert(cfg, s) for s in ("a", "b")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, experts):
    """14 windows in two duration buckets (1 s: 7, 2 s: 7), 4 windows per caption, chunks of 3."""
    folder = tmp_path_factory.mktemp("stream") / "cache"
    records = [synthetic_record(i, experts, durations=(1.0, 2.0), windows_per_caption=4, seed=3) for i in range(14)]
    write_cache(folder, records, NAMES, shard_size=3)
    return folder, records


# ---- order ---------------------------------------------------------------------------------------
SIZES = {"1s": [5, 5, 3, 7], "2s": [4, 4], "tiny": [1]}


def _run(sampler, n):
    return [sampler.batch(k) for k in range(n)]


def test_batch_k_depends_on_seed_and_k_only_ranks_disjoint_one_bucket_each():
    full = [StreamBatchSampler(SIZES, 2, seed=5, length=20, rank=r, world_size=2, shuffle_chunks=2) for r in (0, 1)]
    resumed = StreamBatchSampler(SIZES, 2, seed=5, length=20, next_batch=7, rank=1, world_size=2, shuffle_chunks=2)
    it = iter(resumed)
    assert [[(b, w) for _, b, w in next(it)] for _ in range(7, 20)] == [[(full[1].batch(k)[0], w) for w in full[1].batch(k)[1]]
                                                                        for k in range(7, 20)]
    per_epoch = full[0].batches_per_epoch()
    assert per_epoch == 20 // 4 + 8 // 4  # "tiny" cannot fill batch_size x ranks and is left out
    for k in range(2 * per_epoch):
        (b0, w0), (b1, w1) = full[0].batch(k), full[1].batch(k)
        assert b0 == b1 and len(w0) == len(w1) == 2 and not set(w0) & set(w1)  # one bucket, disjoint slices
    for e in range(2):  # an epoch never repeats a window; each bucket gives floor(n / 4) * 4 of them
        seen = {}
        for k in range(e * per_epoch, (e + 1) * per_epoch):
            for r in (0, 1):
                b, w = full[r].batch(k)
                seen.setdefault(b, []).extend(w)
        assert {b: len(v) for b, v in seen.items()} == {"1s": 20, "2s": 8}
        assert all(len(set(v)) == len(v) and max(v) < sum(SIZES[b]) for b, v in seen.items())
    assert _run(full[0], per_epoch) != [full[0].batch(k) for k in range(per_epoch, 2 * per_epoch)]  # a new order per epoch
    other_seed = StreamBatchSampler(SIZES, 2, seed=6, length=20, world_size=2)
    assert _run(other_seed, per_epoch) != _run(full[0], per_epoch)


def test_chunks_are_dealt_to_devices_x_workers_readers_disjoint_and_balanced():
    from soe.data.streaming import _deal
    from soe.errors import DataError

    sizes = [5, 5, 3, 7, 2, 6]
    loads, dealt = _deal(sizes, [3, 0, 5, 1, 4, 2], 3)
    assert sorted(c for d in dealt for c in d) == list(range(6)) and loads == [sum(sizes[c] for c in d) for d in dealt]
    assert max(loads) - min(loads) <= max(sizes) and dealt[0] == [3, 4]  # each reader's chunks in the given order
    assert _deal(sizes, [2, 4, 1, 0, 5, 3], 3)[0] == loads  # each reader's share size: the chunk sizes alone
    s = StreamBatchSampler({"x": [4] * 6, "y": [4] * 2}, 2, seed=0, length=1, world_size=2, num_workers=2)
    assert s.names == ["x"] and s.batches_per_epoch() == 2 * 2  # "y": 2 chunks for 4 readers, left out
    with pytest.raises(DataError, match=r"data.batch_size: no bucket gives batch_size = 2 windows to each of its 4 readers"):
        StreamBatchSampler({"y": [4] * 2}, 2, seed=0, length=1, world_size=2, num_workers=2)


def test_shuffle_buffer_is_bounded_by_shuffle_chunks():
    s = StreamBatchSampler({"x": [4] * 10}, 1, seed=0, length=1, shuffle_chunks=3)
    order, group_starts = s._reader(0, 0, 0)  # one reader: it gets every chunk
    assert sorted(order) == list(range(10))
    chunk_of = lambda w: w // 4  # noqa: E731
    for g, start in enumerate(group_starts):
        end = group_starts[g + 1] if g + 1 < len(group_starts) else 40
        assert {chunk_of(s.window_at(0, 0, 0, p)) for p in range(start, end)} == set(order[3 * g: 3 * g + 3])
    assert [s.window_at(0, 0, 0, p) for p in range(12)] != list(range(12))  # shuffled within the group


# ---- storage -------------------------------------------------------------------------------------
def test_text_states_trimmed_and_padded_back_exactly_bf16_bits():
    t = torch.zeros(512, 16)
    t[:23] = torch.randn(23, 16)
    stored = pack(trim(t), "bfloat16")
    assert stored.shape == (23, 16) and stored.dtype == torch.int16
    assert torch.equal(pad(unpack(stored, "bfloat16"), 512), t.bfloat16().float())
    ids = torch.tensor([261, 5, 2, 0, 0])
    assert torch.equal(pad(unpack(pack(trim(ids), "bfloat16"), "bfloat16"), 5), ids)  # integers stay integers


def test_cache_reads_back_every_window_with_one_text_per_caption(cache, experts):
    folder, records = cache
    meta, rows, windows = load_cache(folder)
    shapes = {b: {s: list(next(r for r in records if r["seconds"] == sec)[s]["latents"].shape) for s in ("a", "b")}
              for b, sec in (("1s", 1.0), ("2s", 2.0))}  # each bucket's first window
    assert meta["buckets"] == {"1s": {"windows": 7, "seconds": 1.0, "shapes": shapes["1s"]},
                               "2s": {"windows": 7, "seconds": 2.0, "shapes": shapes["2s"]}}
    assert sorted(r["id"] for r in rows) == [r["id"] for r in records]
    by_id = {r["id"]: w for r, w in zip(rows, windows)}
    for r in records:
        for side in ("a", "b"):
            got, want = by_id[r["id"]][side], r[side]
            assert got.keys() == want.keys()
            assert torch.equal(got["latents"], want["latents"].float())  # float32 recipe: latents as trained
            for k in want:
                if k != "latents":
                    assert torch.equal(got[k], want[k].bfloat16().float() if want[k].is_floating_point() else want[k]), k
    c = StreamingCache(folder)
    assert [sum(c.sizes[f"texts/{s}"]) for s in ("a", "b")] == [4, 4]  # 14 windows, 4 captions


def test_text_states_of_any_length_come_back_padded_exactly_with_one_text_chunk_kept(tmp_path, monkeypatch):
    """Trimmed text states of different lengths (and a 0-d one), a text cache that may keep one chunk
    only: every batch equals the states as encoded (bf16), padded back to the encoder's length, even when
    its windows refer to three text chunks."""
    import soe.data.stream_read as stream_read
    from soe.data.stream_synthetic import random_record

    def record(i):
        r = random_record(i, {"a": (2, 3), "b": (4,)}, {"a": (6, 5), "b": (7,)}, windows_per_caption=2)
        n = 1 + (i // 2) % 6  # the caption's length: 1..6 rows
        r["a"]["text"][n:] = 0
        r["b"]["text"][1 + (i // 2) % 7:] = 0
        r["b"]["scale"] = torch.tensor(float(i // 2))
        return r

    records = [record(i) for i in range(24)]
    write_cache(tmp_path / "c", records, {"a": "x", "b": "y"}, shard_size=3)  # 12 captions: 4 text chunks per side
    monkeypatch.setattr(stream_read, "TEXT_SHARE", 1e-9)
    c = StreamingCache(tmp_path / "c", buffer_chunks=1)
    assert [c.text_chunks_kept(s) for s in ("a", "b")] == [1, 1]
    want = {r["id"]: r for r in records}
    n = sum(c.chunk_sizes("1s"))
    for indices in ([0, 7, 13, 1], [n - 1, 0, 4]):  # windows of captions in 3 and 2 text chunks, out of order
        got = c.batch("1s", indices)
        for j, wid in enumerate(got["id"]):
            assert torch.equal(got["a"]["text"][j], want[wid]["a"]["text"].bfloat16().float())  # padded back to 6 rows
            assert torch.equal(got["b"]["text"][j], want[wid]["b"]["text"].bfloat16().float())
            assert float(got["b"]["scale"][j]) == float(want[wid]["b"]["scale"])
        assert all(len(c._texts[s].held) == 1 for s in ("a", "b"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int16])
def test_a_shuffle_buffer_above_one_huge_page_is_an_ordinary_writable_tensor(dtype):
    from soe.data.stream_chunks import HUGE_PAGE, huge_page_empty

    rows = HUGE_PAGE // (6 * dtype.itemsize) + 3  # just above one huge page: the mapped allocation
    t = huge_page_empty((rows, 2, 3), dtype)
    assert t.shape == (rows, 2, 3) and t.dtype == dtype and t.is_contiguous()
    t.copy_(torch.arange(rows * 6).reshape(rows, 2, 3) % 1000)
    assert torch.equal(t.index_select(0, torch.tensor([rows - 1, 0])).long(), torch.tensor([rows * 6 - 6, 0])[:, None, None].add(torch.arange(6).reshape(2, 3)) % 1000)


def test_a_chunk_is_read_by_its_number_without_searching_the_index(cache, monkeypatch):
    """litdata finds the chunk of a plain item number by walking every chunk of the index (at 1,563 chunks
    per bucket the last chunk read 24x slower per window); the cache names the chunk itself."""
    from litdata.streaming.config import ChunksConfig

    folder, _ = cache
    want = load_cache(folder)[2]

    def search(self, index):
        raise AssertionError("searched the chunk index")

    monkeypatch.setattr(ChunksConfig, "_get_chunk_index_from_index", search)
    got = load_cache(folder)[2]
    assert len(got) == len(want) == 14
    for g, w in zip(got, want):
        for side in ("a", "b"):
            assert all(torch.equal(g[side][k], w[side][k]) for k in w[side])


def test_batches_from_a_small_buffer_equal_the_windows_read_one_by_one(cache):
    """A buffer of 1 chunk per bucket: batches that need several chunks (as one straddling two shuffle
    groups does) come out the same, and the process never holds more than the buffer."""
    folder, _ = cache
    meta, rows, windows = load_cache(folder)
    by_id = {r["id"]: w for r, w in zip(rows, windows)}
    c = StreamingCache(folder, buffer_chunks=1)
    for bucket in c.buckets:
        n = sum(c.chunk_sizes(bucket))
        indices = [n - 1, 0, 3, 1, n - 1]  # three chunks of 3 windows, one window twice, out of order
        got = c.batch(bucket, indices)
        assert len(got["id"]) == len(indices) and got["id"][0] == got["id"][-1]
        for j, wid in enumerate(got["id"]):
            for side in ("a", "b"):
                assert set(got[side]) == set(by_id[wid][side])
                for k, v in got[side].items():
                    assert torch.equal(v[j], by_id[wid][side][k]), (wid, side, k)
        assert len(c._windows[bucket].held) == 1
    sampler = StreamBatchSampler({b: c.chunk_sizes(b) for b in c.buckets}, 2, seed=1, length=1, shuffle_chunks=2)
    for k in range(2 * sampler.batches_per_epoch()):  # the sliced batch equals window_at position by position
        bucket, w = sampler.batch(k)
        b = sampler.names.index(bucket)
        e, j = divmod(k, sampler.batches_per_epoch())
        first = int(sampler._slots(e, 0)[1][j]) * 2
        assert w == [sampler.window_at(b, e, 0, p) for p in range(first, first + 2)]


@pytest.mark.parametrize("width", [8, 2048])  # windows of 0.2 KB (copied into the buffer) and 72 KB (kept as read)
def test_batches_equal_windows_read_one_by_one_for_small_and_large_windows(tmp_path, width):
    from soe.data.stream_chunks import VIEW_BYTES
    from soe.data.stream_synthetic import random_record

    records = [random_record(i, {"a": (3, width), "b": (6, width)}, {"a": (2, 3), "b": (4,)}) for i in range(10)]
    write_cache(tmp_path / "c", records, {"a": "x", "b": "y"}, shard_size=3)
    want = {r["id"]: r for r in records}
    c = StreamingCache(tmp_path / "c", buffer_chunks=2)
    for indices in ([9, 0, 4, 1], [5, 5, 2], [7]):  # 3 chunks (more than the buffer holds), a window twice, one alone
        got = c.batch("1s", indices)
        assert got["id"] == [f"w{i:07d}" for i in indices]
        for side in ("a", "b"):
            assert torch.equal(got[side]["latents"], torch.stack([want[w][side]["latents"] for w in got["id"]]))
        assert len(c._windows["1s"].held) <= 2
    assert c._windows["1s"].views == (9 * width * 4 >= VIEW_BYTES)


def test_recipe_data_cache_dir_holds_the_local_copy_of_a_url_cache(cache, experts, tmp_path):
    from types import SimpleNamespace

    from soe.data.build import build_datamodule

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    cfg = load_recipe(recipe, [f"data.path=local:{cache[0]}", f"data.cache_dir={tmp_path / 'copies'}"])
    assert cfg.data.cache_dir == str(tmp_path / "copies")
    dm = build_datamodule(cfg, SimpleNamespace(a=experts["a"], b=experts["b"]))
    dm.setup()
    assert (tmp_path / "copies") in dm.cache.folder.parents and (dm.cache.folder / "meta.json").is_file()
    assert not any(dm.cache.folder.rglob("windows/*/chunk-*.bin"))  # setup checks shapes from meta.json: no chunk fetched
    dm.cache.window(dm.cache.buckets[0], 0)
    assert any(dm.cache.folder.rglob("windows/*/chunk-*.bin"))  # a batch reads its chunk through the copy


# ---- bad shards ----------------------------------------------------------------------------------
@pytest.fixture
def broken(cache, tmp_path):
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(cache[0], folder)
    return folder


def test_setup_checks_shapes_from_meta_without_reading_a_window_chunk(cache, experts, tmp_path, monkeypatch):
    """Each rank checks every bucket's latent shapes and conditioning keys at setup: from meta.json, where
    the merge records them, so no window chunk is read (or downloaded) for it; a wrong shape is one line,
    and caches merged before meta held shapes are checked from their first window as before."""
    import json

    reads = []
    read = StreamingCache._read_chunk
    monkeypatch.setattr(StreamingCache, "_read_chunk", lambda self, sub, c: reads.append(sub) or read(self, sub, c))
    StreamingLatentDataModule(experts, cache[0], batch_size=2).setup()
    assert reads == []
    records = [synthetic_record(i, experts, windows_per_caption=4, seed=3) for i in range(4)]
    for r in records:
        r["a"]["latents"] = torch.zeros(3, 3, 3, 3)
    write_cache(tmp_path / "bad", records, NAMES, shard_size=4)
    for legacy in (False, True):
        if legacy:
            meta = json.loads((tmp_path / "bad" / "meta.json").read_text())
            del meta["buckets"]["1s"]["shapes"]
            (tmp_path / "bad" / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(LatentCacheError, match=r"bucket '1s' a/latents has shape \[3, 3, 3, 3\], expert 'wan2.1' expects"):
            StreamingLatentDataModule(experts, tmp_path / "bad", batch_size=2).setup()
        assert any(r.startswith("windows/") for r in reads) == legacy


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_missing_or_truncated_shard_is_one_line_naming_it(broken, case):
    chunk = broken / "windows" / "2s" / "chunk-0-1.bin"
    chunk.unlink() if case == "missing" else chunk.write_bytes(chunk.read_bytes()[:-7])
    with pytest.raises(LatentCacheError, match="windows/2s/chunk-0-1.bin") as err:
        StreamingCache(broken)
    assert "\n" not in str(err.value) and ("missing" in str(err.value) if case == "missing" else "truncated" in str(err.value))


def test_shard_deleted_mid_run_is_one_line_naming_it(broken, experts):
    dm = StreamingLatentDataModule(experts, broken, batch_size=2, seed=0, num_workers=1, shuffle_chunks=1)
    dm.setup()
    loader = dm.make_loader(dm.make_batch_sampler(50, 0, 0, 1))
    it = iter(loader)
    next(it)
    for p in (broken / "windows").rglob("chunk-*.bin"):
        p.unlink()
    with pytest.raises(LatentCacheError, match=r"shard 'windows/\ds/chunk-0-\d\.bin' disappeared") as err:
        for _ in range(50):
            next(it)
    assert "\n" not in str(err.value)


def test_an_unmerged_cache_is_refused(tmp_path, experts):
    records = [synthetic_record(i, experts) for i in range(4)]
    write_cache(tmp_path / "c", records[:2], NAMES, part=0, parts=2)
    with pytest.raises(LatentCacheError, match=r"not merged yet .*--shard I/N"):
        StreamingCache(tmp_path / "c")
    write_cache(tmp_path / "c", records[2:], NAMES, part=1, parts=2)  # the last part merges
    assert len(load_cache(tmp_path / "c")[1]) == 4


# ---- exact resume through Lightning --------------------------------------------------------------
def train(recipe, run_dir, steps, *overrides):
    from soe.cli.stitch import run_training

    return run_training(recipe, [f"run_dir={run_dir}", f"trainer.max_steps={steps}", *overrides], console=QUIET, progress=False)


@pytest.mark.slow
def test_resume_is_exact_with_workers(cache, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    data = [f"data.path={cache[0]}", "data.num_workers=2"]
    straight = train(recipe, tmp_path / "straight", 6, *data)["module"]
    train(recipe, tmp_path / "split", 2, *data)
    resumed = train(recipe, tmp_path / "split", 6, *data, "resume=true")["module"]
    a, b = straight.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from soe.train.run_folder import RunFolderError

    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "split").rglob("*"))
    with pytest.raises(RunFolderError, match=r"^resume: data.num_workers 2 -> 0: .* resume with data.num_workers=2$"):
        train(recipe, tmp_path / "split", 8, f"data.path={cache[0]}", "data.num_workers=0", "resume=true")  # batches depend on it
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "split").rglob("*")) == before  # refused before anything is written
    train(recipe, tmp_path / "split", 7, *data, "resume=true")  # the same count resumes


@pytest.mark.slow
def test_two_ddp_ranks_resume_exactly_on_a_streamed_cache(cache, tmp_path):
    """2 CPU processes (DDP over gloo) with a loader worker each: 2 steps + resume to 4 equals 4 straight steps."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    args = [f"data.path={cache[0]}", "data.num_workers=1", "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(run_dir, steps, *extra):
        cmd = [sys.executable, "-m", "soe.cli", "stitch", str(recipe),
               f"run_dir={run_dir}", f"trainer.max_steps={steps}", *args, *extra]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    finish = finished_checkpoint

    straight_proc = start(tmp_path / "straight", 4)  # beside the split run: Lightning starts rank 1 once rank 0 is set up
    try:
        finish(start(tmp_path / "split", 2), tmp_path / "split")
        resumed = finish(start(tmp_path / "split", 4, "resume=true"), tmp_path / "split")
    finally:
        straight = finish(straight_proc, tmp_path / "straight")
    assert resumed["global_step"] == straight["global_step"] == 4
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


# ---- each chunk read once per epoch --------------------------------------------------------------
def test_two_ranks_two_workers_read_every_chunk_exactly_once_per_epoch(tmp_path, experts, monkeypatch):
    """4 readers (2 ranks x 2 loader workers): every window chunk is decoded by exactly one worker process
    in an epoch, each process reads one reader's share, and the epoch's batches use each window once."""
    import itertools
    import json

    folder = tmp_path / "cache"
    records = [synthetic_record(i, experts, durations=(1.0, 2.0), windows_per_caption=4, seed=3) for i in range(32)]
    write_cache(folder, records, NAMES, shard_size=2)  # 16 windows per bucket, 8 chunks of 2
    dm = StreamingLatentDataModule(experts, folder, batch_size=2, seed=4, num_workers=2, shuffle_chunks=2)
    dm.setup()
    log = tmp_path / "reads.jsonl"
    read = StreamingCache._read_chunk

    def counted(self, sub, chunk):  # runs in the (forked) worker processes
        with open(log, "a") as f:
            f.write(json.dumps([os.getpid(), sub, chunk]) + "\n")
        return read(self, sub, chunk)

    monkeypatch.setattr(StreamingCache, "_read_chunk", counted)
    shares, used = [], []  # each reader's chunks ("sub", chunk); every window the epoch's batches use
    for rank in (0, 1):
        sampler = dm.make_batch_sampler(100, 0, rank, 2)
        n = sampler.batches_per_epoch()
        assert n == 2 * 4  # 2 workers x (2 buckets x 4 windows per reader / batch_size 2)
        for v in (0, 1):
            share = set()
            for k in range(v, n, 2):
                assert sampler.reader(k) == rank * 2 + v
                bucket, windows = sampler.batch(k)
                starts = dm.cache.starts[f"windows/{bucket}"]
                share |= {(f"windows/{bucket}", max(c for c, s in enumerate(starts) if s <= w)) for w in windows}
                used += [(bucket, w) for w in windows]
            shares.append(frozenset(share))
        batches = list(itertools.islice(iter(sampler), n))  # exactly one epoch: no prefetch into the next
        got = list(dm.make_loader(batches))
        assert [int(b["step"][0]) for b in got] == list(range(n))
    reads = [tuple(r) for r in map(json.loads, log.read_text().splitlines())]
    window_reads = [(pid, sub, c) for pid, sub, c in reads if sub.startswith("windows/")]
    every_chunk = {(f"windows/{b}", c) for b in dm.cache.buckets for c in range(len(dm.cache.chunk_sizes(b)))}
    assert sorted((sub, c) for _, sub, c in window_reads) == sorted(every_chunk)  # each chunk read exactly once
    by_pid = {}
    for pid, sub, c in window_reads:
        by_pid.setdefault(pid, set()).add((sub, c))
    assert len(by_pid) == 4 and sorted(map(sorted, by_pid.values())) == sorted(map(sorted, shares))  # one share per process
    epoch = {(b, w) for b in dm.cache.buckets for w in range(sum(dm.cache.chunk_sizes(b)))}
    assert len(used) == len(set(used)) and set(used) == epoch  # no window twice; with shares this even, none left out


def test_resume_with_another_num_workers_is_refused_in_one_line(cache, experts):
    from soe.errors import DataError

    dm = StreamingLatentDataModule(experts, cache[0], batch_size=2, seed=0, num_workers=2, shuffle_chunks=2)
    dm.setup()
    state = dm.make_loader(dm.make_batch_sampler(10, 3, 0, 1)).state_dict()
    assert state == {"next_batch": 3, "num_workers": 2}
    other = StreamingLatentDataModule(experts, cache[0], batch_size=2, seed=0, num_workers=0, shuffle_chunks=2)
    other.setup()
    loader = other.make_loader(other.make_batch_sampler(10, 0, 0, 1))
    with pytest.raises(DataError, match=r"data.num_workers: .* resume with data.num_workers=2") as err:
        loader.load_state_dict(state)
    assert "\n" not in str(err.value)
    loader.load_state_dict({"next_batch": 5})  # checkpoints from before the count was recorded
    assert loader.batch_sampler.next_batch == 5
