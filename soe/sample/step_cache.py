"""Step cache for sampling: first-block caching with one decision for the whole stitched model.

diffusers' ``FirstBlockCache`` runs the first transformer block at every sampling step and, when its
residual (output - input) barely changed since the last fully computed step, skips the remaining
blocks and adds the residual those blocks produced last time. Applied to each expert of a stitched
model separately it would be unsafe: one expert could skip while the other recomputes, and the
recomputing one would read stale intermediate states of the skipping one through its connectors (or
an expert would skip although what the other injects into it changed).

Here the same idea runs as diffusers ``ModelHook`` s (``HookRegistry``) on the blocks of *both*
experts, in the order the stitched model runs them (inserted blocks included), with one decision per
call:

* head (each expert's first block): runs; its output and residual are kept.
* decision, taken at the first later block entered once the heads of *all* experts have run in
  this call (blocks entered before that just compute): skip only if every head residual moved by
  less than ``threshold`` (mean absolute change relative to the last computed call). Connectors at
  the first block pair read exactly these head outputs, so a stable decision means stable
  injections there too.
* skip: every later block returns its input; each expert's last block returns ``head output + the
  residual of its whole body at the last computed call``. Blocks, connector additions and injected
  keys/values in between are replaced together, never recomputed from stale states.

Saving is largest with the lockstep and fused engines (both heads run first); under the one-way hook
engine the source expert runs to its end before the host's head, so only the host saves. The cache
holds state between the calls of one sampling run: :meth:`StepCache.reset` before each new run
(``soe.sample.sampler`` does). When classifier-free guidance runs as two forwards per step, the sampler
names each (``state.branch``) and residuals are compared and reused within a branch only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

HOOK_NAME = "soe_step_cache"


@dataclass
class _State:
    threshold: float
    sides: tuple[str, ...]
    branch: str = ""  # which forward of a step this is (the sampler's CFG passes): residuals are kept per branch
    heads_done: set = field(default_factory=set)
    skip: bool | None = None  # decision of the current call (None: not taken yet)
    head_out: dict = field(default_factory=dict)  # side -> head output of this call
    head_res: dict = field(default_factory=dict)  # side -> head residual of this call
    ref_res: dict = field(default_factory=dict)  # (branch, side) -> head residual at the branch's last computed call
    body_res: dict = field(default_factory=dict)  # (branch, side) -> tail output - head output at that call
    computed: int = 0
    skipped: int = 0
    changes: list = field(default_factory=list)  # largest relative head change per decided call

    def reset(self):
        self.heads_done, self.skip = set(), None
        self.head_out, self.head_res, self.ref_res, self.body_res = {}, {}, {}, {}
        self.computed = self.skipped = 0
        self.changes = []

    @torch.compiler.disable
    def decide(self) -> bool:
        keys = [(self.branch, s) for s in self.sides]
        if any(k not in self.ref_res or k not in self.body_res or self.ref_res[k].shape != self.head_res[k[1]].shape for k in keys):
            return False  # nothing cached for this branch yet, or another batch size (a CFG-free step of a guidance interval)
        change = 0.0
        for s in self.sides:
            ref = self.ref_res[(self.branch, s)]
            change = max(change, ((self.head_res[s] - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)).item())
        self.changes.append(change)
        return change < self.threshold


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _BlockHook(ModelHook):
    """One hook class for head, body and tail blocks of one expert (``role`` says which)."""

    _is_stateful = True

    def __init__(self, state: _State, side: str, role: str):
        super().__init__()
        self.state, self.side, self.role = state, side, role

    def new_forward(self, module, *args, **kwargs):
        st, side = self.state, self.side
        if self.role == "head":
            x = _hidden_of(args, kwargs)
            out = self.fn_ref.original_forward(*args, **kwargs)
            _check_tensor(out, module)
            if side in st.heads_done:  # this expert's head runs again: a new call begins
                st.heads_done, st.skip = set(), None
            st.heads_done.add(side)
            st.head_out[side], st.head_res[side] = out, out - x
            return out
        if st.skip is None and st.heads_done == set(st.sides):  # first later block once every head ran: decide for all
            st.skip = st.decide()
            if st.skip:
                st.skipped += 1
            else:
                st.computed += 1
                st.ref_res.update({(st.branch, s): r for s, r in st.head_res.items()})
        if st.skip:
            if self.role == "tail":
                return st.head_out[side] + st.body_res[(st.branch, side)]
            return _hidden_of(args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.role == "tail":
            _check_tensor(out, module)
            st.body_res[(st.branch, side)] = out - st.head_out[side]
        return out

    def reset_state(self, module):
        self.state.reset()
        return module


def _check_tensor(out, module):
    if not torch.is_tensor(out):
        raise NotImplementedError(f"step cache: block {type(module).__name__} returns {type(out).__name__}; "
                                  "only blocks that return the hidden state tensor are supported")


class StepCache:
    """First-block step cache over the blocks of one or more experts (``{side: [blocks in run order]}``)."""

    def __init__(self, blocks: dict[str, list[nn.Module]], threshold: float = 0.1):
        if not threshold >= 0:
            raise ValueError(f"step cache threshold: expected >= 0, got {threshold}")
        short = [s for s, bl in blocks.items() if len(bl) < 2]
        if short:
            raise ValueError(f"step cache: expert(s) {short} have fewer than 2 blocks")
        self.state = _State(threshold, tuple(blocks))
        self._modules: list[nn.Module] = []
        for side, bl in blocks.items():
            for k, block in enumerate(bl):
                role = "head" if k == 0 else "tail" if k == len(bl) - 1 else "body"
                HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self.state, side, role), HOOK_NAME)
                self._modules.append(block)

    def reset(self) -> None:
        """Forget every cached residual (call before each new sampling run)."""
        self.state.reset()

    @property
    def stats(self) -> dict:
        return {"computed": self.state.computed, "skipped": self.state.skipped, "changes": list(self.state.changes)}

    def remove(self) -> None:
        for m in self._modules:
            m._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
        self._modules.clear()


def stitched_blocks(stitcher) -> dict[str, list[nn.Module]]:
    """Each expert's blocks in the order the stitched model runs them (inserted blocks included)."""
    return {s: stitcher.run_order(s) for s in ("a", "b")}


def apply_step_cache(stitcher, threshold: float = 0.1) -> StepCache:
    """A :class:`StepCache` over both experts of ``stitcher``; ``soe.sample.sampler`` resets it at each run."""
    cache = StepCache(stitched_blocks(stitcher), threshold)
    for e in (stitcher.a, stitcher.b):
        e._soe_step_cache = cache  # found by soe.sample.speed.reset_step_caches
    return cache
