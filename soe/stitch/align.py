"""Alignment between two experts: which blocks pair up (depth maps) and how token sequences with
different time rates line up (by seconds, never by index)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from soe.errors import SoeError
from soe.plugin.expert import TokenLayout

Pairs = list[tuple[int, int]]


class DepthMapError(SoeError, ValueError):
    """A depth map (block pairs) that does not fit the two experts."""


# ---- depth maps ---------------------------------------------------------------------------------
def linear_pairs(n_a: int, n_b: int) -> Pairs:
    """Spread the shallower expert's blocks over the deeper one, end-aligned.

    Block ``k`` of the shallower expert pairs with block ``floor((k+1) * deep/shallow) - 1`` of the
    deeper one, so the last blocks always meet (30 vs 24: 0-0, 1-1, 2-2, 3-4, ..., 23-29).
    """
    if n_a <= 0 or n_b <= 0:
        raise DepthMapError(f"depth map: both experts need at least one block, got {n_a} and {n_b}")
    shallow, deep = min(n_a, n_b), max(n_a, n_b)
    idx = [(k + 1) * deep // shallow - 1 for k in range(shallow)]
    return [(i, k) for k, i in enumerate(idx)] if n_a >= n_b else [(k, i) for k, i in enumerate(idx)]


def every_k_pairs(n_a: int, n_b: int, k: int) -> Pairs:
    """Every k-th pair of the linear map (the k-th, 2k-th, ... so the deepest pair is kept when k divides)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise DepthMapError(f"depth map 'every': expected a positive integer, got {k!r}")
    lin = linear_pairs(n_a, n_b)
    if k > len(lin):
        raise DepthMapError(f"depth map 'every: {k}' keeps no pair: the linear map has only {len(lin)} pairs")
    return [p for n, p in enumerate(lin) if (n + 1) % k == 0]


def validate_pairs(pairs: Sequence, n_a: int, n_b: int) -> Pairs:
    """Explicit pairs ``[(i, j), ...]``: in range, strictly increasing in both experts."""
    out: Pairs = []
    if len(pairs) == 0:
        raise DepthMapError("depth map: the explicit pair list is empty; give at least one [i, j] pair")
    for n, p in enumerate(pairs):
        if (not isinstance(p, (list, tuple))) or len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise DepthMapError(f"depth map pair #{n}: expected [i, j] with two integers, got {p!r}")
        i, j = int(p[0]), int(p[1])
        if not 0 <= i < n_a:
            raise DepthMapError(f"depth map pair #{n} {[i, j]}: block {i} of expert a is out of range 0..{n_a - 1}")
        if not 0 <= j < n_b:
            raise DepthMapError(f"depth map pair #{n} {[i, j]}: block {j} of expert b is out of range 0..{n_b - 1}")
        if out and (i <= out[-1][0] or j <= out[-1][1]):
            raise DepthMapError(
                f"depth map pair #{n} {[i, j]}: pairs must be strictly increasing in both experts "
                f"(previous pair {list(out[-1])}), so blocks can run in lockstep"
            )
        out.append((i, j))
    return out


def resolve_depth_map(spec, n_a: int, n_b: int) -> Pairs:
    """``"linear"``, ``{"every": k}``, ``"identity"`` (equal depths) or an explicit list of pairs."""
    if isinstance(spec, str):
        if spec == "linear":
            return linear_pairs(n_a, n_b)
        if spec == "identity":
            if n_a != n_b:
                raise DepthMapError(f"depth map 'identity' needs equal depths, got {n_a} and {n_b} blocks")
            return [(i, i) for i in range(n_a)]
        if spec == "auto":
            raise DepthMapError("depth map 'auto' is chosen from the experts on paired clips (soe.stitch.auto_pairs.choose_pairs; "
                                "recipes: stitch.pairs: auto); pass the chosen list of [i, j] pairs here")
        raise DepthMapError(f"depth map: unknown name '{spec}'; expected 'linear', 'identity', 'auto', {{every: k}} or a list of [i, j] pairs")
    if isinstance(spec, dict):
        if set(spec) != {"every"}:
            raise DepthMapError(f"depth map: a mapping must be {{every: k}}, got keys {sorted(spec)}")
        return every_k_pairs(n_a, n_b, spec["every"])
    if isinstance(spec, (list, tuple)):
        return validate_pairs(spec, n_a, n_b)
    raise DepthMapError(f"depth map: expected 'linear', {{every: k}} or a list of [i, j] pairs, got {type(spec).__name__}")


# ---- time alignment -----------------------------------------------------------------------------
def pool_time_steps(hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Average the tokens of each time step: ``(B, N, D) -> (B, T, D)``."""
    b, n, d = hidden.shape
    if n != layout.num_tokens:
        raise ValueError(f"hidden state has {n} tokens but its token layout {layout.grid} has {layout.num_tokens}")
    return hidden.reshape(b, layout.num_steps, layout.tokens_per_step, d).mean(dim=2)


MOMENT_SLOTS = 3  # mean, first moment along the first non-time axis, along the last one


def pool_time_moments(hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Per time step, the mean of the tokens and their first moments along the first and the last
    non-time axis (rows and columns of a video grid): ``(B, N, D) -> (B, T, 3 * D)``.

    The mean alone is blind to *where* something is within a time step (a video expert's tokens
    carry no absolute position); the moments ``mean(h * y)``, ``mean(h * x)`` with coordinates in
    [-1, 1] keep it at a fixed width for any resolution. A layout with only a time axis (audio) has
    zero moments.
    """
    b, n, d = hidden.shape
    steps = hidden.reshape(b, layout.num_steps, layout.tokens_per_step, d)
    mean = steps.mean(dim=2)
    if len(layout.grid) == 1:
        return torch.cat([mean, torch.zeros_like(mean), torch.zeros_like(mean)], dim=-1)
    inner = layout.grid[1:]
    moments = []
    for axis in (0, len(inner) - 1):
        shape = [1] * len(inner)
        shape[axis] = inner[axis]
        coord = torch.linspace(-1, 1, inner[axis], device=hidden.device, dtype=hidden.dtype).view(shape).expand(inner).reshape(-1)
        moments.append((steps * coord[:, None]).mean(dim=2))
    return torch.cat([mean, *moments], dim=-1)


def pool_steps(hidden: torch.Tensor, layout: TokenLayout, mode: str = "mean") -> torch.Tensor:
    """``mean``: :func:`pool_time_steps`; ``moments``: :func:`pool_time_moments`."""
    return pool_time_moments(hidden, layout) if mode == "moments" else pool_time_steps(hidden, layout)


def broadcast_to_grid(steps: torch.Tensor, layout: TokenLayout, start: int | None = None, stop: int | None = None) -> torch.Tensor:
    """Repeat one vector per time step over the non-time axes: ``(B, T, D) -> (B, N, D)``; with ``start``/``stop``
    only the tokens ``start:stop`` of the grid (a rank's part of a sequence split by context parallelism)."""
    b, t, d = steps.shape
    if start is not None:
        return steps.index_select(1, token_steps(layout, start, stop, steps.device))  # (B, stop - start, D)
    return steps[:, :, None, :].expand(b, t, layout.tokens_per_step, d).reshape(b, layout.num_tokens, d)


# ---- pooling a part of a sequence (context parallel) ----------------------------------------------
def token_steps(layout: TokenLayout, start: int, stop: int, device=None) -> torch.Tensor:
    """The time step of each token ``start:stop`` of the flattened grid: ``(stop - start,)`` long."""
    return torch.arange(start, stop, device=device) // layout.tokens_per_step


def partial_pool_steps(hidden: torch.Tensor, layout: TokenLayout, start: int, mode: str = "mean") -> torch.Tensor:
    """What the tokens ``start:start + n`` of ``hidden (B, n, D)`` contribute to :func:`pool_steps` of the whole
    sequence ``(B, T, D or 3 * D)``: per time step, their sums divided by the step's token count (zero for the
    steps they do not touch). The contributions of all parts add up to :func:`pool_steps` of the whole; a rank
    holding one part sums them with an all-reduce of ``(B, T, ...)`` vectors, never gathering the tokens."""
    b, n, _ = hidden.shape
    steps = token_steps(layout, start, start + n, hidden.device)  # (n,)
    parts = [hidden]
    if mode == "moments":
        inner = layout.grid[1:]
        if len(inner) == 0:
            parts += [torch.zeros_like(hidden), torch.zeros_like(hidden)]
        else:
            within = torch.arange(start, start + n, device=hidden.device) % layout.tokens_per_step  # (n,) index inside a step
            for axis in (0, len(inner) - 1):
                stride = 1
                for g in inner[axis + 1:]:
                    stride *= g
                index = within // stride % inner[axis]
                coord = torch.linspace(-1, 1, inner[axis], device=hidden.device, dtype=hidden.dtype)[index]  # (n,)
                parts.append(hidden * coord[:, None])
    x = torch.cat(parts, dim=-1)  # (B, n, D or 3 * D)
    sums = x.new_zeros(b, layout.num_steps, x.shape[-1]).index_add(1, steps, x)  # (B, T, ...)
    return sums / layout.tokens_per_step


def _linear_matrix(src: TokenLayout, dst: TokenLayout) -> torch.Tensor:
    # Position of each host time step centre in source index units, clamped to the source span.
    pos = (dst.timestamps(dtype=torch.float64) * src.time_rate - 0.5).clamp(0, src.num_steps - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=src.num_steps - 1)
    frac = pos - lo
    w = torch.zeros(dst.num_steps, src.num_steps, dtype=torch.float64)
    rows = torch.arange(dst.num_steps)
    w[rows, lo] += 1 - frac
    w[rows, hi] += frac
    return w


def _area_matrix(src: TokenLayout, dst: TokenLayout) -> torch.Tensor:
    # Overlap (in seconds) of each host step interval with each source step interval.
    d0 = torch.arange(dst.num_steps, dtype=torch.float64)[:, None] / dst.time_rate
    s0 = torch.arange(src.num_steps, dtype=torch.float64)[None, :] / src.time_rate
    overlap = (torch.minimum(d0 + 1 / dst.time_rate, s0 + 1 / src.time_rate) - torch.maximum(d0, s0)).clamp(min=0)
    total = overlap.sum(dim=1, keepdim=True)
    w = overlap / total.clamp(min=1e-12)
    empty = total.squeeze(1) <= 0  # host steps past the end of the source: nearest source step
    if empty.any():
        w[empty] = _linear_matrix(src, dst)[empty]
    return w


def resample_matrix(src: TokenLayout, dst: TokenLayout, mode: str = "auto") -> torch.Tensor:
    """Weights ``(T_dst, T_src)`` mapping source time steps onto host time steps by their timestamps.

    ``linear`` interpolates between the two nearest source steps; ``area`` averages the source steps
    overlapping each host step (no aliasing when the source is faster); ``auto`` picks ``area`` when
    the source has more steps per second than the host, else ``linear``.
    """
    if mode == "auto":
        mode = "area" if src.time_rate > dst.time_rate else "linear"
    if mode == "linear":
        return _linear_matrix(src, dst)
    if mode == "area":
        return _area_matrix(src, dst)
    raise ValueError(f"resample mode: expected 'auto', 'linear' or 'area', got {mode!r}")


def resample_time(steps: torch.Tensor, src: TokenLayout, dst: TokenLayout, mode: str = "auto") -> torch.Tensor:
    """``(B, T_src, D) -> (B, T_dst, D)`` by seconds. Identity when the time axes coincide."""
    if src.num_steps == dst.num_steps and math.isclose(src.time_rate, dst.time_rate):
        return steps
    w = resample_matrix(src, dst, mode).to(device=steps.device, dtype=steps.dtype)
    return torch.einsum("ts,bsd->btd", w, steps)
