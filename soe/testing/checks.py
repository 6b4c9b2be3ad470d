"""The expert contract, one property per check (run and reported by ``soe.testing``).

Each check takes the subject under test (``soe.testing``: fresh tiny instances and dummy batches of the
expert), tests one property against a reference and returns a one-line summary, or raises
:class:`ContractFailure` saying how the property fails.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from soe.plugin.expert import Expert

if TYPE_CHECKING:
    from soe.testing import _Subject

SPLIT_TOL = dict(rtol=1e-5, atol=1e-5)  # split forward vs native forward
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)  # gradients with vs without checkpointing
SAVE_TOL = dict(rtol=1.3e-6, atol=1e-5)  # outputs after a save/load round trip
SECONDS = (1.0, 1.6)  # clip lengths the forward checks run at (1.6 s hits non-integer frame counts)


class ContractFailure(Exception):
    """Raised inside a check: the property does not hold (message = how)."""


# ---- comparisons that explain themselves ---------------------------------------------------------
def _compare(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float, atol: float) -> str:
    """Raise :class:`ContractFailure` unless ``got`` is close to ``ref``; return a summary of the difference."""
    if got.shape != ref.shape:
        raise ContractFailure(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise ContractFailure(f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values")
    diff = (got.float() - ref.float()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    bound = atol + rtol * ref.float().abs()
    bad = int((diff > bound).sum())
    if bad:
        raise ContractFailure(f"{what}: {bad}/{diff.numel()} values off, max |diff| {worst:.3g} "
                    f"(max |ref| {ref.abs().max().item():.3g}; tolerance rtol {rtol:g}, atol {atol:g})")
    return f"max |diff| {worst:.2g}"


# ---- the checks ----------------------------------------------------------------------------------
def check_attributes(s: _Subject) -> str:
    from soe.plugin.listing import declared_info, info_dict

    cls = s.cls
    missing = [a for a in ("name", "modality") if not getattr(cls, a, "")]
    if missing:
        raise ContractFailure(f"class attributes {missing} are empty")
    if "tiny" not in cls.presets and cls.tiny.__func__ is Expert.tiny.__func__:
        raise ContractFailure(f"no 'tiny' preset (presets: {sorted(cls.presets)}) and tiny() is not overridden")
    e = s.fresh()
    b = s.batch(e)
    for key in ("latents", "timestep"):
        if key not in b:
            raise ContractFailure(f"dummy_batch() has no '{key}' key (keys: {sorted(b)})")
    if tuple(b["timestep"].shape) != (2,):
        raise ContractFailure(f"dummy_batch(2)['timestep'] must be sigma per sample, shape (2,), got {tuple(b['timestep'].shape)}")
    if tuple(b["latents"].shape) != tuple(e.latent_shape(2, 1.0)):
        raise ContractFailure(f"dummy_batch latents {tuple(b['latents'].shape)} != latent_shape(2, 1.0) {tuple(e.latent_shape(2, 1.0))}")
    n_params = sum(p.numel() for p in e.parameters())
    listed = declared_info(cls.name)  # what `soe experts` lists without importing the class (soe/plugin/listing.py)
    if listed is not None and _entry_point_class(cls.name) is cls and info_dict(cls) != info_dict(listed):
        raise ContractFailure(f"the soe.experts.info description {info_dict(listed)} differs from the class: {info_dict(cls)}")
    return f"{cls.name!r} ({cls.modality}), {e.num_blocks} blocks, width {e.hidden_size}, tiny has {n_params:,} parameters"


def _entry_point_class(name: str):
    from soe.plugin.registry import _entry_points, get_expert

    return get_expert(name) if name in _entry_points() else None


def check_split_forward(s: _Subject) -> str:
    e, out = s.fresh(), []
    for seconds in SECONDS:
        b = s.batch(e, 2, seconds)
        with torch.no_grad():
            native, split = e(b), e.split_forward(b)
        if native.shape != b["latents"].shape:
            raise ContractFailure(f"at {seconds} s the native forward returns {tuple(native.shape)}, latents are {tuple(b['latents'].shape)}")
        out.append(f"{seconds} s: " + _compare(split, native, f"split vs native forward at {seconds} s", **SPLIT_TOL))
    return "head(blocks(embed(b))) == forward(b); " + ", ".join(out)


def check_token_layout(s: _Subject) -> str:
    e = s.fresh()
    b = s.batch(e, 2, 1.0)
    layout = e.token_layout(b)
    expect = (2, layout.num_tokens, e.hidden_size)
    with torch.no_grad():
        state = e.embed(b)
        if tuple(state.hidden.shape) != expect:
            raise ContractFailure(f"embed() hidden {tuple(state.hidden.shape)} != (B, layout tokens {layout.grid}, hidden_size) {expect}")
        state = e.run_block(0, state)
        if tuple(state.hidden.shape) != expect:
            raise ContractFailure(f"run_block(0) hidden {tuple(state.hidden.shape)} != {expect}")
        args, kwargs = _first_block_call(e, b)
        out = e.blocks[0](*args, **kwargs)
        if tuple(e.block_output_hidden(out).shape) != expect:
            raise ContractFailure(f"block_output_hidden(blocks[0] output) {tuple(e.block_output_hidden(out).shape)} != {expect}: "
                        "the hook engine would see a different token sequence than the split forward")
    if abs(layout.seconds - 1.0) > 1.0 / layout.time_rate + 1e-6:
        raise ContractFailure(f"a 1 s batch spans {layout.seconds:.3f} s ({layout.num_steps} steps at {layout.time_rate:g}/s)")
    layout2 = e.token_layout(s.batch(e, 1, 2.0))
    if layout2.time_rate != layout.time_rate:
        raise ContractFailure(f"time_rate changes with clip length: {layout.time_rate:g}/s at 1 s, {layout2.time_rate:g}/s at 2 s")
    if abs(layout2.num_steps - 2 * layout.num_steps) > 1:
        raise ContractFailure(f"2 s gives {layout2.num_steps} time steps, 1 s gives {layout.num_steps}: not about twice")
    return f"grid {layout.grid} {layout.axes} at {layout.time_rate:.4g} tokens/s for 1 s, hidden (B, {layout.num_tokens}, {e.hidden_size})"


def _first_block_call(e: Expert, b) -> tuple[tuple, dict]:
    """The arguments block 0 receives in the native forward (captured by a pre-hook that stops the run)."""
    seen = {}

    def grab(module, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _StopForward

    h = e.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        e(b)
    except _StopForward:
        pass
    finally:
        h.remove()
    if "call" not in seen:
        raise ContractFailure("blocks[0] never ran during the native forward: `blocks` is not the list the model iterates")
    return seen["call"]


class _StopForward(Exception):
    pass


def check_hook_roundtrip(s: _Subject) -> str:
    e = s.fresh()
    b = s.batch(e)
    with torch.no_grad():
        ref = e(b)
        counts = []

        def hook(module, args, out):
            counts.append(1)
            return e.with_block_output_hidden(out, e.block_output_hidden(out) * 1.0)

        handles = [blk.register_forward_hook(hook) for blk in e.blocks]
        try:
            got = e(b)
        finally:
            for h in handles:
                h.remove()
    if len(counts) != e.num_blocks:
        raise ContractFailure(f"the native forward ran {len(counts)} of the {e.num_blocks} blocks in `blocks` (hooks need every block called once)")
    return "re-inserting every block's own hidden state through forward hooks: " + _compare(got, ref, "output with identity hooks", 0, 0)


def _partner_name(cls: type[Expert], partner: str | None) -> str:
    if partner and partner != "auto":
        return partner
    return "ace-step-1.5" if cls.modality == "video" else "wan2.1"


def check_zero_init_stitch(s: _Subject, partner: str | None = "auto") -> str:
    from soe.plugin.registry import get_expert
    from soe.stitch.stitcher import Stitcher

    name = _partner_name(s.cls, partner)
    notes = []
    for direction in ("a_to_b", "b_to_a", "both"):
        a, b = s.fresh(), get_expert(name).tiny(1).eval()
        st = Stitcher(a, b, direction=direction)
        ba, bb = s.batch(a, 2, 1.0, seed=3), s.batch(b, 2, 1.0, seed=4)
        with torch.no_grad():
            pa, pb = st(ba, bb)
            ref_a, ref_b = a(ba), b(bb)
        tol = dict(rtol=0, atol=0) if st.engine == "hooks" else SPLIT_TOL  # lockstep runs the split forward
        _compare(pa, ref_a, f"{direction} ({st.engine} engine) output of this expert", **tol)
        _compare(pb, ref_b, f"{direction} ({st.engine} engine) output of partner {name}", **tol)
        notes.append(direction)
    return f"fresh Stitcher with partner {name!r} reproduces both experts ({', '.join(notes)}; {len(st.pairs)} pairs)"


def check_meta_presets(s: _Subject) -> str:
    from soe.plugin.stand_in import differences

    sizes, stand_ins = [], []
    for preset in s.cls.presets:
        with torch.device("meta"):
            e = s.cls.from_preset(preset, device="meta")
        real = [n for n, p in e.named_parameters() if p.device.type != "meta"]
        if real:
            raise ContractFailure(f"preset {preset!r} allocated real memory for {len(real)} tensors, e.g. {real[0]}")
        if not e.num_blocks or e.num_blocks != len(e.blocks):
            raise ContractFailure(f"preset {preset!r}: num_blocks {e.num_blocks}, len(blocks) {len(e.blocks)}")
        stand_in = s.cls.stand_in(dict(s.cls.presets[preset]))  # what `soe inspect` builds instead (soe/plugin/stand_in.py)
        if stand_in is not None:
            wrong = differences(stand_in, e)
            if wrong:
                raise ContractFailure(f"preset {preset!r}: the stand-in differs from the model: {'; '.join(wrong)}")
            stand_ins.append(preset)
        sizes.append(f"{preset}: {sum(p.numel() for p in e.parameters()):,}")
    if not sizes:
        raise ContractFailure("the class declares no presets")
    return "parameters on meta: " + ", ".join(sizes) + (f"; stand-ins equal for {', '.join(stand_ins)}" if stand_ins else "")


def check_save_load(s: _Subject) -> str:
    e = s.fresh()
    b = s.batch(e)
    with tempfile.TemporaryDirectory() as tmp:
        e.save(Path(tmp) / "ckpt")
        loaded = s.cls.load(Path(tmp) / "ckpt").eval()
        with torch.no_grad():
            detail = _compare(loaded(b), e(b), "output after save() + load()", **SAVE_TOL)
        try:
            s.cls.load(Path(tmp) / "nowhere")
        except FileNotFoundError:
            pass
        else:
            raise ContractFailure("load() of a missing folder did not raise FileNotFoundError")
    return f"save() + load() round trip: {detail}; a missing folder raises FileNotFoundError"


def check_lora_targets(s: _Subject) -> str:
    from soe.errors import RecipeError
    from soe.lora.adapters import match_modules

    e = s.fresh()
    if not e.lora_targets:
        raise ContractFailure("lora_targets is empty: recipes with `train: lora` would have nothing to adapt")
    counts = []
    for pattern in e.lora_targets:
        try:
            counts.append(len(match_modules(e.model, [pattern], where="lora_targets")))
        except RecipeError as err:
            raise ContractFailure(str(err)) from None
    return "modules matched per pattern: " + ", ".join(f"{p!r}: {n}" for p, n in zip(e.lora_targets, counts))


def check_gradient_checkpointing(s: _Subject) -> str:
    def grads(ckpt: bool, split: bool):
        e = s.fresh().train()
        e.set_gradient_checkpointing(ckpt)
        b = s.batch(e)
        out = e.split_forward(b) if split else e(b)
        out.square().mean().backward()
        return {n: p.grad for n, p in e.named_parameters() if p.grad is not None}

    for split in (False, True):
        which = "split" if split else "native"
        ref, got = grads(False, split), grads(True, split)
        if not ref:
            raise ContractFailure(f"{which} forward: no parameter received a gradient")
        if ref.keys() != got.keys():
            raise ContractFailure(f"{which} forward: checkpointing changes which parameters get gradients "
                        f"(only without: {sorted(ref.keys() - got.keys())[:3]}, only with: {sorted(got.keys() - ref.keys())[:3]})")
        for n in ref:
            _compare(got[n], ref[n], f"{which} forward, grad of {n}", **GRAD_TOL)
    return f"same gradients with and without checkpointing, native and split forward ({len(ref)} tensors)"


def check_unconditional(s: _Subject) -> str:
    e = s.fresh()
    b = s.batch(e)
    if not e.condition_keys:
        raise ContractFailure("condition_keys is empty: classifier-free guidance would drop nothing")
    missing = [k for k in e.condition_keys if k not in b]
    if missing:
        raise ContractFailure(f"condition_keys {missing} are not keys of dummy_batch() ({sorted(b)})")
    u = e.unconditional(b)
    for k, v in b.items():
        if k in e.condition_keys and torch.count_nonzero(u[k]):
            raise ContractFailure(f"unconditional()[{k!r}] has {int(torch.count_nonzero(u[k]))} non-zero values")
        if k not in e.condition_keys and u[k] is not v:
            raise ContractFailure(f"unconditional() replaced {k!r}, which is not a condition key")
    return f"zeroes {list(e.condition_keys)}, keeps the rest"


CHECKS: dict[str, Callable[..., str]] = {
    "attributes": check_attributes,
    "split_forward": check_split_forward,
    "token_layout": check_token_layout,
    "hook_roundtrip": check_hook_roundtrip,
    "zero_init_stitch": check_zero_init_stitch,
    "meta_presets": check_meta_presets,
    "save_load": check_save_load,
    "lora_targets": check_lora_targets,
    "gradient_checkpointing": check_gradient_checkpointing,
    "unconditional": check_unconditional,
}
