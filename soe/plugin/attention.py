"""Softmax attention through diffusers' attention dispatcher, for processors that soe (or a plugin) writes.

diffusers' own processors (Wan's) call ``dispatch_attention_fn`` with their ``_attention_backend``; the
processors soe adds (attention key/value injection, soe/stitch/attention_kv.py) and the ones its plugins port
(ACE-Step v1's cross-attention) call :func:`attend`, so ``sample.attention_backend`` (flash, sage, cuDNN, ...)
reaches every softmax attention of a stitched model. Hand-written here: only the layout change (soe's
processors hold ``(B, H, S, d)``, the dispatcher takes ``(B, S, H, d)``) and the rule for masked calls: a
backend that takes no mask (flash, sage) leaves a masked call to torch's SDPA (``native``), whose result is
the same. The recipe refuses a backend whose package is missing
(``soe.schema.sample.missing_attention_package``); the dispatcher's own checks (versions, devices) stay diffusers'.
"""
from __future__ import annotations

import torch

# Backends that apply an additive/boolean mask themselves; the others get masked calls routed to `native`.
TAKES_MASK = {"native", "_native_math", "_native_efficient", "_native_cudnn", "_native_npu", "xformers"}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           backend: str | None = None) -> torch.Tensor:
    """Softmax attention of ``q (B, H, S, d)`` over ``k, v (B, H, L, d)`` -> ``(B, H, S, d)``.

    ``backend`` None = the dispatcher's active backend (``attention_backend(...)`` context, or
    ``DIFFUSERS_ATTN_BACKEND``; torch's SDPA by default). ``mask``: additive ``(B|1, H|1, S, L)`` or None."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn  # only when attention runs

    if mask is not None and (backend is not None and str(getattr(backend, "value", backend)) not in TAKES_MASK):
        backend = AttentionBackendName.NATIVE  # flash/sage take no mask: same result through SDPA
    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, backend=backend)
    return out.transpose(1, 2)  # (B, H, S, d)
