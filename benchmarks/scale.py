"""Scale on paper: universe1 at real size on 1, 8 and 64 GPUs under DDP, FSDP and FSDP + activation
checkpointing; writes ``benchmarks/scale.md``.

    python benchmarks/scale.py                       # FLOPs counted on the meta device (no weights, CPU, ~1 min)
    python benchmarks/scale.py --device cuda         # also time one real video block fwd+bwd (bf16) to calibrate MFU

FLOPs per block are measured with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
at the recipe's clip (5 s, 480x832 at 25 fps -> 31 x 30 x 52 video tokens, 31 audio tokens). Memory
is counted from the parameters on the meta device and an activation model per block; GPU figures
are published H100 numbers. Every assumption is printed into scale.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _common as C  # noqa: F401  (puts the checkout on sys.path)
import torch
from torch.utils.flop_counter import FlopCounterMode

from soe.recipe.builders import build_stitcher
from soe.recipe.reading import load_recipe
from soe.train.build import apply_training_setup

UNIVERSE1 = Path(__file__).parents[1] / "recipes" / "universe1.yaml"
OUT = Path(__file__).parent / "scale.md"

# ---- published figures and assumptions ------------------------------------------------------------------
GPU = dict(name="H100 SXM 80GB", bf16_flops=989e12, memory=80e9, nvlink=450e9, ib=50e9)  # dense bf16; NVLink per direction; 400 Gb/s IB per GPU
MFU = {"ddp": 0.40, "fsdp": 0.38, "fsdp+ac": 0.38}  # model FLOPs utilisation of long-sequence DiT training (attention-bound, flash attention)
ACT_BYTES_PER_TOKEN_HIDDEN = 34 + 10 + 8  # bf16 bytes saved per token x hidden per block: Korthikanti et al. 34 (flash attention: no s^2 term) + cross-attention + wider FFN
WORKSPACE = 4e9  # CUDA context, allocator fragmentation, NCCL buffers


def count(args) -> dict:
    cfg = load_recipe(UNIVERSE1)
    with torch.device("meta"):
        st = build_stitcher(cfg, device="meta", load_weights=False)
        apply_training_setup(st, cfg)
    g = torch.Generator().manual_seed(0)
    secs = cfg.data.seconds
    batch = {s: {k: v.to("meta") for k, v in getattr(st, s).dummy_batch(1, secs, g).items()} for s in ("a", "b")}
    out = {"seconds": secs, "micro_batch": cfg.data.batch_size, "accumulate": cfg.trainer.accumulate_grad_batches}
    for side in ("a", "b"):
        e = getattr(st, side)
        state = e.embed(batch[side])
        fc = FlopCounterMode(display=False)
        with fc:
            e.run_block(0, state)
        fc_all = FlopCounterMode(display=False)
        with fc_all:
            e.split_forward(batch[side])
        lay = e.token_layout(batch[side])
        out[side] = dict(name=e.name, blocks=e.num_blocks, hidden=e.hidden_size, tokens=lay.num_tokens, block_flops=fc.get_total_flops(),
                         fwd_flops=fc_all.get_total_flops(),
                         frozen=sum(p.numel() for p in e.parameters() if not p.requires_grad),
                         lora=sum(p.numel() for p in e.parameters() if p.requires_grad),
                         block_params=max(sum(p.numel() for p in b.parameters()) for b in e.blocks))
    fc = FlopCounterMode(display=False)
    with fc:
        la, lb = st.a.token_layout(batch["a"]), st.b.token_layout(batch["b"])
        for (i, j) in st.pairs:
            h_a = torch.empty(1, la.num_tokens, st.a.hidden_size, device="meta")
            h_b = torch.empty(1, lb.num_tokens, st.b.hidden_size, device="meta")
            st.connector_for("b_to_a", i)(h_b, lb, la)
            st.connector_for("a_to_b", j)(h_a, la, lb)
    out["connector_flops"] = fc.get_total_flops()
    out["connectors"] = sum(p.numel() for p in st.connectors.parameters())
    # UniVerse-1's inserted blocks and new key/value projections train too (their FLOPs are small: the
    # inserted blocks run on the audio expert's few tokens, the projections on one token per time step)
    out["fusion"] = sum(p.numel() for p in st.fusion.parameters()) if st.fusion is not None else 0
    return out


def estimate(c: dict, n_gpus: int, mode: str) -> dict:
    a, b = c["a"], c["b"]
    frozen = a["frozen"] + b["frozen"]  # bf16
    trainable = a["lora"] + b["lora"] + c["connectors"] + c.get("fusion", 0)  # fp32 param + grad + 2 AdamW moments = 16 B
    fwd = a["fwd_flops"] + b["fwd_flops"] + c["connector_flops"]
    # LoRA on frozen weights: backward needs input grads (~1x fwd) but no weight grads of frozen layers.
    step_flops = fwd * (2 + (1 if mode == "fsdp+ac" else 0))  # + one recomputed forward with activation checkpointing
    shard = n_gpus if mode.startswith("fsdp") else 1
    params_mem = (2 * frozen + 16 * trainable) / shard
    if mode.startswith("fsdp"):  # all-gathered working set: the biggest block of each expert, twice for prefetch
        params_mem += 2 * 2 * (a["block_params"] + b["block_params"])
    act_block = {s: ACT_BYTES_PER_TOKEN_HIDDEN * x["tokens"] * x["hidden"] * c["micro_batch"] for s, x in (("a", a), ("b", b))}
    if mode == "fsdp+ac":  # only block inputs stay, plus one block's full activations while it recomputes
        acts = sum(2 * x["tokens"] * x["hidden"] * x["blocks"] * c["micro_batch"] for x in (a, b)) + max(act_block.values())
    else:
        acts = act_block["a"] * a["blocks"] + act_block["b"] * b["blocks"]
    mem = params_mem + acts + WORKSPACE
    compute = step_flops * c["micro_batch"] / (GPU["bf16_flops"] * MFU[mode])  # per micro-batch, per GPU
    if n_gpus == 1:
        comm = 0.0
    else:
        bw = GPU["nvlink"] if n_gpus <= 8 else GPU["ib"]  # ring collectives leave the node beyond 8 GPUs
        ring = 2 * (n_gpus - 1) / n_gpus
        if mode == "ddp":  # all-reduce of the trainable gradients, once per optimizer step
            comm = ring * 4 * trainable / bw / c["accumulate"]
        else:  # all-gather frozen bf16 weights in fwd and bwd (and recompute), reduce-scatter trainable grads
            gathers = 2 + (1 if mode == "fsdp+ac" else 0)
            comm = (gathers * (n_gpus - 1) / n_gpus * 2 * frozen + ring * 4 * trainable) / bw
    micro = max(compute, comm)  # communication overlaps compute (FSDP prefetch, DDP bucketing)
    return dict(mem=mem, acts=acts, params_mem=params_mem, compute=compute, comm=comm,
                step=micro * c["accumulate"], clips_per_s=n_gpus * c["micro_batch"] * c["accumulate"] / (micro * c["accumulate"]),
                fits=mem <= GPU["memory"])


def calibrate(c: dict) -> str:
    """Time one real Wan block fwd+bwd in bf16 at the recipe's token count: measured MFU on this GPU."""
    from soe import get_expert

    torch.manual_seed(0)
    e = get_expert("wan2.1").from_preset("1.3b", device="cuda", dtype=torch.bfloat16, num_layers=1)
    batch = {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.to("cuda")) for k, v in e.dummy_batch(1, c["seconds"]).items()}
    state = e.embed(batch)
    h = state.hidden.detach().requires_grad_(True)
    timer = C.Timer("cuda")
    run = lambda: e.run_block(0, state.replace(h)).hidden.float().square().mean().backward()
    run()
    t = sorted(timer(run) for _ in range(5))[2]
    mfu = 3 * c["a"]["block_flops"] / t / GPU["bf16_flops"]  # full fwd+bwd (weights train here): 3x forward FLOPs
    return f"measured on this GPU: one Wan2.1-1.3B block fwd+bwd at {c['a']['tokens']} tokens: {t * 1e3:.1f} ms = {100 * mfu:.0f}% MFU"


def render(c: dict, calib: str | None) -> str:
    a, b = c["a"], c["b"]
    lines = [
        "# universe1 at scale (estimated)",
        "",
        "Generated by `python benchmarks/scale.py`; do not edit by hand. Estimates, not measurements of a multi-GPU run.",
        "",
        "## What one micro-batch costs (counted)",
        "",
        f"- clip: {c['seconds']} s; micro-batch {c['micro_batch']} clip(s) per GPU, {c['accumulate']} micro-batches per optimizer step",
        f"- video `{a['name']}`: {a['blocks']} blocks, hidden {a['hidden']}, {a['tokens']} tokens; "
        f"{a['block_flops'] / 1e12:.2f} TFLOP per block forward, {a['fwd_flops'] / 1e12:.1f} TFLOP whole forward",
        f"- audio `{b['name']}`: {b['blocks']} blocks, hidden {b['hidden']}, {b['tokens']} tokens; "
        f"{b['block_flops'] / 1e12:.4f} TFLOP per block forward, {b['fwd_flops'] / 1e12:.2f} TFLOP whole forward",
        f"- connectors: {c['connectors'] / 1e6:.1f}M parameters, {c['connector_flops'] / 1e9:.2f} GFLOP forward (all pairs, both directions)",
        f"- fusion (inserted blocks + new key/value projections): {c.get('fusion', 0) / 1e6:.1f}M parameters, all trained",
        f"- frozen {(a['frozen'] + b['frozen']) / 1e9:.2f}B parameters (bf16); trainable "
        f"{(a['lora'] + b['lora'] + c['connectors'] + c.get('fusion', 0)) / 1e6:.0f}M (LoRA r=64 + connectors + fusion, fp32 + AdamW)",
        "",
        "FLOPs from `torch.utils.flop_counter.FlopCounterMode` on the meta device (matmuls and attention). The video",
        "expert's self-attention over ~48k tokens dominates: the audio side and the connectors are noise in the budget.",
        "",
        "## Per GPU",
        "",
        "| GPUs | strategy | memory / GPU | fits 80 GB | params+states | activations | compute / micro-batch | comm / micro-batch | optimizer step | clips / s (all GPUs) |",
        "|---:|---|---:|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (1, 8, 64):
        for mode in ("ddp", "fsdp", "fsdp+ac"):
            r = estimate(c, n, mode)
            lines.append(f"| {n} | {mode} | {r['mem'] / 1e9:.1f} GB | {'yes' if r['fits'] else 'no'} | {r['params_mem'] / 1e9:.1f} GB | "
                         f"{r['acts'] / 1e9:.1f} GB | {r['compute']:.2f} s | {r['comm']:.3f} s | {r['step']:.2f} s | {r['clips_per_s']:.2f} |")
    lines += [
        "",
        "## Assumptions",
        "",
        f"- GPU: {GPU['name']}, {GPU['bf16_flops'] / 1e12:.0f} TFLOP/s dense bf16, {GPU['memory'] / 1e9:.0f} GB; NVLink "
        f"{GPU['nvlink'] / 1e9:.0f} GB/s within a node of 8, {GPU['ib'] / 1e9:.0f} GB/s per GPU (400 Gb/s InfiniBand) across nodes.",
        f"- MFU: {', '.join(f'{k} {100 * v:.0f}%' for k, v in MFU.items())} (flash attention, long sequences; the recompute of",
        "  activation checkpointing is counted as extra FLOPs, not as lower MFU).",
        "- Training FLOPs per micro-batch = 2 x forward (frozen weights under LoRA need input gradients but no weight",
        "  gradients), + 1 x forward with activation checkpointing.",
        "- Memory: frozen weights 2 B/param; trainable 16 B/param (fp32 weight, grad, two AdamW moments). DDP replicates",
        "  everything; FSDP shards it over all GPUs and holds the biggest block of each expert twice (prefetch).",
        f"- Activations: {ACT_BYTES_PER_TOKEN_HIDDEN} B x tokens x hidden per block in bf16 (34 from Korthikanti et al. 2022 with flash",
        "  attention, + cross-attention + the wider FFN); with checkpointing only each block's input (2 B x tokens x",
        f"  hidden) stays, plus one block's activations during its recompute. {WORKSPACE / 1e9:.0f} GB workspace per GPU.",
        "- Communication overlaps compute; a micro-batch takes max(compute, communication). DDP all-reduces only the",
        "  trainable gradients (once per optimizer step); FSDP all-gathers the frozen bf16 weights in forward, backward",
        "  and recompute, and reduce-scatters trainable gradients.",
        "- The recipe's own choice (8 GPUs, FSDP, gradient checkpointing on both experts) is the `8 | fsdp+ac` row.",
    ]
    if calib:
        lines += ["", f"- {calib}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cuda: also time a real block to calibrate MFU")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    c = count(args)
    calib = calibrate(c) if args.device.startswith("cuda") else None
    text = render(c, calib)
    Path(args.out).write_text(text)
    print(text)
    r = estimate(c, 8, "fsdp+ac")
    print(f"ratio: universe1 on 8 GPUs (fsdp+ac) uses {r['mem'] / GPU['memory']:.2f} of each GPU's memory; "
          f"optimizer step {r['step']:.1f} s")


if __name__ == "__main__":
    main()
