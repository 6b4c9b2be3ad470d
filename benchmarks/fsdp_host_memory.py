"""Peak host memory per rank when FSDP2 sets up a stitch whose experts come from files.

Two ways, each in 2 fresh CPU processes (gloo), on the same pair of experts written to a temporary
folder (Wan2.1 + ACE-Step v1 architectures, about 1.1 GB of fp32 weights together):

* ``whole``: what every strategy but fsdp2 does, and what fsdp2 did before: each rank loads both
  experts whole (``build_stitcher``), then ``StitchModule.configure_model`` shards them.
* ``meta``: what ``soe stitch`` does under ``trainer.strategy=fsdp2`` now: experts, connectors and
  LoRA adapters built on the meta device (``build_stitcher_to_shard``), then ``configure_model``
  draws each connector and adapter (sharding each connector before the next), shards, and loads each
  rank's shard of the experts one block at a time.

Each rank reads every byte of its shards once, then reports two peaks, each next to its value right
after the imports:

* resident set size (``VmHWM``): everything mapped and touched, including the pages of torch's shared
  libraries and of the weight files, which every rank on a node shares with the others (the page cache
  holds them once);
* private memory (``RssAnon``, the heap; sampled every millisecond by a thread, the kernel keeps no peak
  of it): what each rank adds on its own, so what a node needs per extra rank.

Printed: the peaks and their ratio (target <= 0.6), and the same for the memory above the imports.

    python benchmarks/fsdp_host_memory.py [--wan-layers 8 --ace-layers 6 --width 1024]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # run as `python benchmarks/x.py` from a checkout


def status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process, in MiB. Not ``ru_maxrss``:
    that one keeps the peak of the parent the worker was forked from."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class PeakPrivate:
    """The highest ``RssAnon`` seen by a thread that reads it every millisecond while it runs."""

    def __init__(self) -> None:
        self.peak = status_mb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, status_mb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status_mb("RssAnon"))


def write_recipe(folder: Path) -> None:
    text = f"""
name: fsdp_host_memory
run_dir: {folder}/run
experts:
  a: {{name: wan2.1, path: {folder}/wan, train: lora, lora: {{r: 8, alpha: 8}}}}
  b: {{name: ace-step, path: {folder}/ace, options: {{sample_rate: 25600}}, train: lora, lora: {{r: 8, alpha: 8}}}}
stitch: {{pairs: linear, direction: both, detach_source: true}}
data: {{kind: synthetic, seconds: 1.0, batch_size: 2, num_clips: 4}}
trainer: {{accelerator: cpu, devices: 2, strategy: fsdp2}}
"""
    (folder / "recipe.yaml").write_text(text)


def worker(rank: int, mode: str, folder: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from soe.recipe.builders import build_stitcher
    from soe.schema import OptimConfig
    from soe.train.build import apply_training_setup, build_objective, build_stitcher_to_shard
    from soe.train.module import StitchModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from soe.recipe.reading import load_recipe

    cfg = load_recipe(Path(folder) / "recipe.yaml", [])
    imported, imported_private = status_mb("VmRSS"), status_mb("RssAnon")
    private = PeakPrivate()
    torch.manual_seed(0)
    if mode == "whole":
        stitcher, plan = build_stitcher(cfg), None
    else:
        stitcher, plan = build_stitcher_to_shard(cfg)
    apply_training_setup(stitcher, cfg, plan=plan)
    module = StitchModule(stitcher, build_objective(cfg, stitcher), OptimConfig(), plan=plan)
    module._device_mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    module.configure_model()  # what Lightning's ModelParallelStrategy calls
    for p in stitcher.parameters():  # read every byte of this rank's shards: weights only mapped from a file count too
        p.to_local().sum()
    local = sum(p.to_local().numel() * p.element_size() for p in stitcher.parameters()) / 2**20
    peak, peak_private = status_mb("VmHWM"), private.stop()
    Path(f"{out}.{rank}").write_text(f"{imported} {peak} {local} {imported_private} {peak_private}")
    dist.barrier()
    dist.destroy_process_group()


def run(mode: str, folder: Path) -> list[tuple[float, ...]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = folder / f"peak-{mode}"
    mp.spawn(worker, args=(mode, str(folder), str(out), port), nprocs=2)
    return [tuple(float(x) for x in Path(f"{out}.{r}").read_text().split()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wan-layers", type=int, default=8)
    ap.add_argument("--ace-layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=1024, help="hidden size of both experts (heads of 128)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from soe import get_expert

    heads = args.width // 128
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wan = get_expert("wan2.1").from_preset("tiny", num_attention_heads=heads, attention_head_dim=128, ffn_dim=4 * args.width,
                                                num_layers=args.wan_layers, in_channels=16, out_channels=16, text_dim=256,
                                                freq_dim=256, height=128, width=128, text_len=16)
        ace = get_expert("ace-step").from_preset("tiny", num_layers=args.ace_layers, inner_dim=args.width,
                                                 num_attention_heads=heads, attention_head_dim=128, sample_rate=25600)
        total = sum(p.numel() * p.element_size() for e in (wan, ace) for p in e.parameters()) / 2**20
        write_recipe(folder)
        wan.save(folder / "wan")
        ace.save(folder / "ace")
        del wan, ace
        print(f"experts: {total:.0f} MiB of fp32 weights (wan2.1 {args.wan_layers} blocks + ace-step {args.ace_layers} blocks, "
              f"width {args.width}); 2 gloo ranks")
        results = {mode: run(mode, folder) for mode in ("whole", "meta")}
    print(f"{'memory':>8} {'rank':>4} {'imports MiB':>12} {'peak whole':>11} {'peak meta':>10} {'ratio':>6} "
          f"{'above imports: ratio':>21} {'shard MiB':>10}")
    for label, at in (("resident", 0), ("private", 3)):
        for r in range(2):
            whole, meta = results["whole"][r], results["meta"][r]
            iw, pw, im, pm = whole[at], whole[at + 1 if at == 0 else 4], meta[at], meta[at + 1 if at == 0 else 4]
            print(f"{label:>8} {r:>4} {im:>12.0f} {pw:>11.0f} {pm:>10.0f} {pm / pw:>6.2f} {(pm - im) / (pw - iw):>21.2f} "
                  f"{meta[2]:>10.0f}")


if __name__ == "__main__":
    main()
