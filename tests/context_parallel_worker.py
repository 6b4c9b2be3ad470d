"""Two gloo ranks running stitches with the video expert's tokens split across them (context parallel), next to
the same stitches in one process; run by tests/test_context_parallel.py as
``python context_parallel_worker.py PORT OUT`` (rank 0 saves what both computed to OUT)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

UNIVERSE1 = {  # the published fusion (recipes/universe1.yaml) on tiny experts, as tests/test_universe1.py builds it
    "b_to_a": {"mode": "attention_kv", "tap": "after_self_attn", "targets": [
        {"attention": "attn1", "mode": "parallel", "window": True, "pre_norm": "norm1", "copy_from": "attn2", "cfg_mask": False},
        {"attention": "attn2", "mode": "concat", "pre_norm": "norm2", "rope": "complex", "rope_query": True, "copy_from": "attn2"}]},
    "a_to_b": {"mode": "attention_kv", "tap": "cross_attn_input", "targets": [{"attention": "cross_attn", "rope": "cat", "rope_theta": 1e6}]},
}


def make(kind: str):
    """A stitch of tiny experts, the same on every call (the connectors drawn, not zero, so they matter)."""
    from soe import Stitcher, get_expert

    audio = "ace-step" if kind.startswith("universe1") else "ace-step-1.5"
    a, b = get_expert("wan2.1").tiny(0), get_expert(audio).tiny(1)
    torch.manual_seed(2)
    opts = {"connector": {"init": "trunc_normal"}, "detach_source": False}
    if kind == "lockstep":  # the tiny recipe's stitch: two-way, linear pairs
        return Stitcher(a, b, pairs="linear", direction="both", **opts)
    if kind == "moments":
        return Stitcher(a, b, pairs="linear", direction="both", connector={"init": "trunc_normal", "pool": "moments"}, detach_source=False)
    if kind in ("hooks_a_to_b", "hooks_b_to_a"):
        return Stitcher(a, b, pairs="linear", direction=kind[6:], engine="hooks", **opts)
    if kind in ("universe1", "universe1_checkpointed"):  # the recipe trains with gradient checkpointing: blocks recomputed
        for e in (a, b):
            e.set_gradient_checkpointing(kind == "universe1_checkpointed")
        return Stitcher(a, b, pairs="identity", depth={"mode": "insert_interpolated", "every": 1}, inject=UNIVERSE1, **opts)
    raise KeyError(kind)


def batches(st, seconds=1.0):
    return {s: getattr(st, s).dummy_batch(2, seconds, torch.Generator().manual_seed(3 + n)) for n, s in enumerate("ab")}


def forward_backward(st):
    """Outputs, and every trainable gradient as a single process would have it (averaged over ranks, as DDP does)."""
    from soe.stitch.context_parallel import scale_split_gradients

    st.train()
    batch = batches(st)
    target = {s: torch.randn(batch[s]["latents"].shape, generator=torch.Generator().manual_seed(9)) for s in "ab"}
    torch.manual_seed(7)  # dropout (ACE-Step v1's lyric encoder): the same masks on the ranks of one sample
    out = scale_split_gradients(st, dict(zip("ab", st(batch["a"], batch["b"]))))
    loss = sum(((out[s] - target[s]) ** 2).mean() for s in "ab")
    loss.backward()
    grads = {}
    for n, p in st.named_parameters():
        if p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if dist.is_initialized() and st.context is not None:
                g = g.clone()
                dist.all_reduce(g)
                g /= dist.get_world_size()
            grads[n] = g
    return {"out": {s: o.detach() for s, o in out.items()}, "grads": grads}


def sample(st):
    """A 4-step joint sample with classifier-free guidance."""
    from soe.sample.sampler import sample_stitched
    from soe.schema import SamplerConfig

    st.eval()
    cond = {s: getattr(st, s).conditioning(1, 1.0, torch.Generator().manual_seed(n)) for n, s in enumerate("ab")}
    with torch.no_grad():
        return sample_stitched(st, cond, 1.0, SamplerConfig(steps=4, guidance={"a": 2.0, "b": 3.0}))


def train(st, steps=3):
    """Three optimiser steps of the flow objective; the same noise and timesteps on both ranks of the sample. SGD with
    momentum: Adam divides by the root of its second moment, which turns float noise in a gradient that is zero in exact
    arithmetic (a bias just before a norm) into steps of size ``lr``, so no two summation orders agree under it."""
    from soe.stitch.context_parallel import scale_split_gradients

    st.train()
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        batch = batches(st)
        gen = torch.Generator().manual_seed(100 + step)  # one draw per sample, whatever the rank
        noised, targets = {}, {}
        for s in "ab":
            x0 = batch[s]["latents"]
            t = torch.rand(x0.shape[0], generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            shape = (-1,) + (1,) * (x0.dim() - 1)
            noised[s] = {**batch[s], "latents": (1 - t.view(shape)) * x0 + t.view(shape) * eps, "timestep": t}
            targets[s] = eps - x0
        torch.manual_seed(step)  # as soe's training_step seeds the global RNG by (step, data-parallel rank)
        out = scale_split_gradients(st, dict(zip("ab", st(noised["a"], noised["b"]))))
        per = {s: ((out[s] - targets[s]) ** 2).mean() for s in "ab"}
        opt.zero_grad()
        sum(per.values()).backward()
        if dist.is_initialized() and st.context is not None:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        losses.append(torch.stack([per["a"].detach(), per["b"].detach()]))
    return {"losses": torch.stack(losses), "trained": {n: p.detach().clone() for n, p in st.named_parameters() if p.requires_grad}}


def main(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from soe.stitch.context_parallel import split_stitcher, world_mesh

    mesh = world_mesh(2)
    results = {}
    jobs = [("lockstep", forward_backward), ("moments", forward_backward), ("hooks_a_to_b", forward_backward),
            ("hooks_b_to_a", forward_backward), ("universe1", forward_backward),
            ("universe1_checkpointed", forward_backward), ("lockstep", sample), ("universe1", sample),
            ("lockstep", train), ("universe1", train)]
    for kind, job in jobs:
        want = job(make(kind))
        st = make(kind)
        split = split_stitcher(st, mesh)
        got = job(st)
        results[f"{kind}.{job.__name__}"] = {"want": want, "got": got, "side": split.side}
    try:  # a sequence that does not split evenly: one line
        st = make("lockstep")
        split_stitcher(st, mesh)
        b = {s: getattr(st, s).dummy_batch(1, 1.0) for s in "ab"}
        b["a"]["latents"] = torch.randn(1, 4, 5, 6, 2)  # 5 x 3 x 1 = 15 tokens
        st(b["a"], b["b"])
        results["uneven"] = "ran"
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        results["uneven"] = f"{type(e).__name__}: {e}"
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(main, args=(sys.argv[1], sys.argv[2]), nprocs=2)
