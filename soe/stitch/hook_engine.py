"""The hook engine: a one-way stitch run through each expert's own native forward.

The source expert runs its forward while ``capture`` hooks keep the outputs of its mapped blocks;
then the host runs its forward while ``add`` hooks add the connector outputs to its mapped blocks'
outputs. Nothing but each expert's block list is needed, so any model can take part
(``soe/stitch/generic.py``). Hooks are idle outside a stitched call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from soe.plugin.expert import Batch, Expert, TokenLayout
from soe.stitch.named_hooks import NamedHooks, hook_name

if TYPE_CHECKING:
    from soe.stitch.stitcher import Stitcher


@dataclass
class _Call:
    """Per-call context the hooks read; they never mutate anything else (pure under recompute)."""

    layouts: dict[str, TokenLayout]
    source_mask: torch.Tensor | None = None
    captured: dict[int, torch.Tensor] = field(default_factory=dict)


class HookEngine:
    """Runs a one-way :class:`~soe.stitch.stitcher.Stitcher` with forward hooks on the experts' own blocks."""

    def __init__(self, stitcher: Stitcher):
        self.st = stitcher
        self._call: _Call | None = None
        # Block input -> the call it belongs to, so a block recomputed in backward (non-reentrant
        # gradient checkpointing) gets the same addition; weak: entries die with the activations.
        self._call_of_input = WeakTensorKeyDictionary()

    def install(self, hooks: NamedHooks) -> None:
        st = self.st
        src_name, host_name = st.source_host
        src, host = getattr(st, src_name), getattr(st, host_name)
        for i_a, j_b in st.pairs:
            i_src, j_host = (i_a, j_b) if st.direction == "a_to_b" else (j_b, i_a)
            hooks.forward_hook(hook_name(st.direction, src_name, i_src, "capture"), src.blocks[i_src], self._capture(src, i_src),
                               "", "keeps the block output for the connector")
            hooks.forward_hook(hook_name(st.direction, host_name, j_host, "add"), host.blocks[j_host],
                               self._add(host, i_src, j_host, src_name, host_name), "", "adds the connector output to the block output",
                               with_kwargs=True)

    def _capture(self, src: Expert, i_src: int):
        def hook(module, args, output):
            if self._call is not None:  # idle outside a stitched call
                self._call.captured[i_src] = src.block_output_hidden(output)

        return hook

    def _add(self, host: Expert, i_src: int, j_host: int, src_name: str, host_name: str):
        conn = self.st.connector_for(self.st.direction, j_host)

        def hook(module, args, kwargs, output):
            block_input = host.block_input_hidden(args, kwargs)
            call = self._call
            if call is not None:
                self._call_of_input[block_input] = call
            else:  # outside a stitched call, unless this is a checkpointed block recomputing
                call = self._call_of_input.get(block_input)
                if call is None:
                    return None
            if i_src not in call.captured:
                raise RuntimeError(f"stitcher: block {i_src} of expert {src_name} did not run before host block {j_host}")
            hidden = host.block_output_hidden(output)  # (B, N_host, D_host)
            source = self.st.connector_input(call.captured[i_src], call.source_mask)
            delta = conn(source, call.layouts[src_name], call.layouts[host_name], self.st.split_of(src_name), self.st.split_of(host_name))
            return host.with_block_output_hidden(output, hidden + delta.to(hidden.dtype))

        return hook

    def run(self, batch_a: Batch, batch_b: Batch, source_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.st
        batches = {"a": batch_a, "b": batch_b}
        src_name, host_name = st.source_host
        self._call = _Call(layouts={"a": st.a.token_layout(batch_a), "b": st.b.token_layout(batch_b)}, source_mask=source_mask)
        try:
            preds = {src_name: getattr(st, src_name)(batches[src_name])}  # fills captured
            preds[host_name] = getattr(st, host_name)(batches[host_name])  # hooks add
        finally:
            self._call = None
        return preds["a"], preds["b"]
