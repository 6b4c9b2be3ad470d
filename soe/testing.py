"""The expert contract as checks a plugin author can run: ``check_expert(MyExpert)``.

Every check builds fresh tiny instances, tests one property against a reference (the model's own
forward, a save/load round trip, gradients without checkpointing, ...) and returns a
:class:`CheckResult` that says what broke and by how much. soe's own contract tests run these same
checks over every registered expert; ``soe experts check NAME_OR_MODULE:CLASS`` runs them from the
command line.

In a plugin's test suite, either::

    from soe.testing import assert_expert_contract
    def test_contract():
        assert_expert_contract(MyExpert)

or, one pytest test per property::

    from soe.testing import ExpertContractTests
    class TestMyExpert(ExpertContractTests):
        expert = MyExpert          # a class, a registered name, or a tiny instance
"""
from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import torch

from soe.errors import SoeError
from soe.expert import Expert

SPLIT_TOL = dict(rtol=1e-5, atol=1e-5)  # split forward vs native forward
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)  # gradients with vs without checkpointing
SAVE_TOL = dict(rtol=1.3e-6, atol=1e-5)  # outputs after a save/load round trip
SECONDS = (1.0, 1.6)  # clip lengths the forward checks run at (1.6 s hits non-integer frame counts)


@dataclass(frozen=True)
class CheckResult:
    """One property of the contract: ``passed`` and a one-line ``detail`` (numbers on failure)."""

    name: str
    passed: bool
    detail: str
    time_s: float = 0.0

    def __str__(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.detail}"


class ExpertSpecError(SoeError, ValueError):
    """``NAME_OR_MODULE:CLASS`` names no expert (unknown name, unimportable module, not an Expert)."""


class _Fail(Exception):
    """Raised inside a check: the property does not hold (message = how)."""


# ---- the thing under test ------------------------------------------------------------------------
def resolve_expert(spec) -> type[Expert]:
    """A registered name (``wan2.1``), ``package.module:Class``, an Expert class or instance -> the class."""
    if isinstance(spec, Expert):
        return type(spec)
    if isinstance(spec, type):
        if not issubclass(spec, Expert):
            raise ExpertSpecError(f"{spec.__qualname__} is not a subclass of soe.Expert")
        return spec
    if not isinstance(spec, str) or not spec:
        raise ExpertSpecError(f"expected an expert name or 'module:Class', got {spec!r}")
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = import_module(module_name)
        except ImportError as e:
            raise ExpertSpecError(f"cannot import module '{module_name}' ({e})") from None
        obj = getattr(module, attr, None)
        if obj is None:
            raise ExpertSpecError(f"module '{module_name}' has no attribute '{attr}'")
        return resolve_expert(obj)
    from soe.registry import UnknownExpertError, get_expert

    try:
        return get_expert(spec)
    except UnknownExpertError as e:
        raise ExpertSpecError(str(e)) from None


class _Subject:
    """Fresh tiny instances of the expert under test, from its class or by copying an instance."""

    def __init__(self, expert, seed: int = 0):
        self.cls = resolve_expert(expert)
        self._instance = expert if isinstance(expert, Expert) else None
        self.seed = seed

    def fresh(self) -> Expert:
        if self._instance is not None:
            return copy.deepcopy(self._instance).eval()
        return self.cls.tiny(self.seed).eval()

    def batch(self, e: Expert, batch_size: int = 2, seconds: float = 1.0, seed: int = 0):
        return e.dummy_batch(batch_size, seconds=seconds, generator=torch.Generator().manual_seed(seed))


# ---- comparisons that explain themselves ---------------------------------------------------------
def _compare(got: torch.Tensor, ref: torch.Tensor, what: str, rtol: float, atol: float) -> str:
    """Raise :class:`_Fail` unless ``got`` is close to ``ref``; return a summary of the difference."""
    if got.shape != ref.shape:
        raise _Fail(f"{what}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(got).all():
        raise _Fail(f"{what}: {int((~torch.isfinite(got)).sum())} non-finite values")
    diff = (got.float() - ref.float()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    bound = atol + rtol * ref.float().abs()
    bad = int((diff > bound).sum())
    if bad:
        raise _Fail(f"{what}: {bad}/{diff.numel()} values off, max |diff| {worst:.3g} "
                    f"(max |ref| {ref.abs().max().item():.3g}; tolerance rtol {rtol:g}, atol {atol:g})")
    return f"max |diff| {worst:.2g}"


# ---- the checks ----------------------------------------------------------------------------------
def check_attributes(s: _Subject) -> str:
    cls = s.cls
    missing = [a for a in ("name", "modality") if not getattr(cls, a, "")]
    if missing:
        raise _Fail(f"class attributes {missing} are empty")
    if "tiny" not in cls.presets and cls.tiny.__func__ is Expert.tiny.__func__:
        raise _Fail(f"no 'tiny' preset (presets: {sorted(cls.presets)}) and tiny() is not overridden")
    e = s.fresh()
    b = s.batch(e)
    for key in ("latents", "timestep"):
        if key not in b:
            raise _Fail(f"dummy_batch() has no '{key}' key (keys: {sorted(b)})")
    if tuple(b["timestep"].shape) != (2,):
        raise _Fail(f"dummy_batch(2)['timestep'] must be sigma per sample, shape (2,), got {tuple(b['timestep'].shape)}")
    if tuple(b["latents"].shape) != tuple(e.latent_shape(2, 1.0)):
        raise _Fail(f"dummy_batch latents {tuple(b['latents'].shape)} != latent_shape(2, 1.0) {tuple(e.latent_shape(2, 1.0))}")
    n_params = sum(p.numel() for p in e.parameters())
    return f"{cls.name!r} ({cls.modality}), {e.num_blocks} blocks, width {e.hidden_size}, tiny has {n_params:,} parameters"


def check_split_forward(s: _Subject) -> str:
    e, out = s.fresh(), []
    for seconds in SECONDS:
        b = s.batch(e, 2, seconds)
        with torch.no_grad():
            native, split = e(b), e.split_forward(b)
        if native.shape != b["latents"].shape:
            raise _Fail(f"at {seconds} s the native forward returns {tuple(native.shape)}, latents are {tuple(b['latents'].shape)}")
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
            raise _Fail(f"embed() hidden {tuple(state.hidden.shape)} != (B, layout tokens {layout.grid}, hidden_size) {expect}")
        state = e.run_block(0, state)
        if tuple(state.hidden.shape) != expect:
            raise _Fail(f"run_block(0) hidden {tuple(state.hidden.shape)} != {expect}")
        args, kwargs = _first_block_call(e, b)
        out = e.blocks[0](*args, **kwargs)
        if tuple(e.block_output_hidden(out).shape) != expect:
            raise _Fail(f"block_output_hidden(blocks[0] output) {tuple(e.block_output_hidden(out).shape)} != {expect}: "
                        "the hook engine would see a different token sequence than the split forward")
    if abs(layout.seconds - 1.0) > 1.0 / layout.time_rate + 1e-6:
        raise _Fail(f"a 1 s batch spans {layout.seconds:.3f} s ({layout.num_steps} steps at {layout.time_rate:g}/s)")
    layout2 = e.token_layout(s.batch(e, 1, 2.0))
    if layout2.time_rate != layout.time_rate:
        raise _Fail(f"time_rate changes with clip length: {layout.time_rate:g}/s at 1 s, {layout2.time_rate:g}/s at 2 s")
    if abs(layout2.num_steps - 2 * layout.num_steps) > 1:
        raise _Fail(f"2 s gives {layout2.num_steps} time steps, 1 s gives {layout.num_steps}: not about twice")
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
        raise _Fail("blocks[0] never ran during the native forward: `blocks` is not the list the model iterates")
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
        raise _Fail(f"the native forward ran {len(counts)} of the {e.num_blocks} blocks in `blocks` (hooks need every block called once)")
    return "re-inserting every block's own hidden state through forward hooks: " + _compare(got, ref, "output with identity hooks", 0, 0)


def _partner_name(cls: type[Expert], partner: str | None) -> str:
    if partner and partner != "auto":
        return partner
    return "ace-step-1.5" if cls.modality == "video" else "wan2.1"


def check_zero_init_stitch(s: _Subject, partner: str | None = "auto") -> str:
    from soe.registry import get_expert
    from soe.stitcher import Stitcher

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
    sizes = []
    for preset in s.cls.presets:
        with torch.device("meta"):
            e = s.cls.from_preset(preset, device="meta")
        real = [n for n, p in e.named_parameters() if p.device.type != "meta"]
        if real:
            raise _Fail(f"preset {preset!r} allocated real memory for {len(real)} tensors, e.g. {real[0]}")
        if not e.num_blocks or e.num_blocks != len(e.blocks):
            raise _Fail(f"preset {preset!r}: num_blocks {e.num_blocks}, len(blocks) {len(e.blocks)}")
        sizes.append(f"{preset}: {sum(p.numel() for p in e.parameters()):,}")
    if not sizes:
        raise _Fail("the class declares no presets")
    return "parameters on meta: " + ", ".join(sizes)


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
            raise _Fail("load() of a missing folder did not raise FileNotFoundError")
    return f"save() + load() round trip: {detail}; a missing folder raises FileNotFoundError"


def check_lora_targets(s: _Subject) -> str:
    from soe.config import RecipeError
    from soe.lora import match_modules

    e = s.fresh()
    if not e.lora_targets:
        raise _Fail("lora_targets is empty: recipes with `train: lora` would have nothing to adapt")
    counts = []
    for pattern in e.lora_targets:
        try:
            counts.append(len(match_modules(e.model, [pattern], where="lora_targets")))
        except RecipeError as err:
            raise _Fail(str(err)) from None
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
            raise _Fail(f"{which} forward: no parameter received a gradient")
        if ref.keys() != got.keys():
            raise _Fail(f"{which} forward: checkpointing changes which parameters get gradients "
                        f"(only without: {sorted(ref.keys() - got.keys())[:3]}, only with: {sorted(got.keys() - ref.keys())[:3]})")
        for n in ref:
            _compare(got[n], ref[n], f"{which} forward, grad of {n}", **GRAD_TOL)
    return f"same gradients with and without checkpointing, native and split forward ({len(ref)} tensors)"


def check_unconditional(s: _Subject) -> str:
    e = s.fresh()
    b = s.batch(e)
    if not e.condition_keys:
        raise _Fail("condition_keys is empty: classifier-free guidance would drop nothing")
    missing = [k for k in e.condition_keys if k not in b]
    if missing:
        raise _Fail(f"condition_keys {missing} are not keys of dummy_batch() ({sorted(b)})")
    u = e.unconditional(b)
    for k, v in b.items():
        if k in e.condition_keys and torch.count_nonzero(u[k]):
            raise _Fail(f"unconditional()[{k!r}] has {int(torch.count_nonzero(u[k]))} non-zero values")
        if k not in e.condition_keys and u[k] is not v:
            raise _Fail(f"unconditional() replaced {k!r}, which is not a condition key")
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


# ---- running them --------------------------------------------------------------------------------
def run_check(name: str, expert, partner: str | None = "auto", seed: int = 0) -> CheckResult:
    """Run one named check; exceptions become failures that name the exception."""
    if name not in CHECKS:
        raise KeyError(f"unknown check {name!r}; checks: {list(CHECKS)}")
    subject = expert if isinstance(expert, _Subject) else _Subject(expert, seed)
    kwargs = {"partner": partner} if name == "zero_init_stitch" else {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    try:
        detail, passed = CHECKS[name](subject, **kwargs), True
    except _Fail as e:
        detail, passed = str(e), False
    except Exception as e:  # a crash is a failed property too; say where
        detail, passed = f"raised {type(e).__name__}: {e}", False
    return CheckResult(name, passed, detail, time.perf_counter() - start)


def check_expert(expert, checks: Sequence[str] | None = None, partner: str | None = "auto", seed: int = 0) -> list[CheckResult]:
    """Run the contract checks on an Expert class, registered name, ``module:Class`` or tiny instance."""
    unknown = [c for c in checks or () if c not in CHECKS]
    if unknown:
        raise ExpertSpecError(f"unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    subject = _Subject(expert, seed)
    return [run_check(name, subject, partner=partner, seed=seed) for name in (checks or CHECKS)]


def assert_expert_contract(expert, **kwargs) -> None:
    """``check_expert`` that raises one AssertionError listing every failed property."""
    failed = [r for r in check_expert(expert, **kwargs) if not r.passed]
    if failed:
        raise AssertionError("expert contract broken:\n" + "\n".join(f"  {r}" for r in failed))


class ExpertContractTests:
    """pytest mixin: set ``expert`` (class, registered name or instance); one test per check."""

    expert = None
    partner: str = "auto"

    def _check(self, name: str) -> None:
        result = run_check(name, self.expert, partner=self.partner)
        assert result.passed, str(result)


for _name in CHECKS:
    setattr(ExpertContractTests, f"test_{_name}", lambda self, _n=_name: self._check(_n))


def results_table(results: Sequence[CheckResult], title: str = "expert contract"):
    """A rich Table: one row per property with PASS/FAIL and its detail."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("property", no_wrap=True)
    t.add_column("result", no_wrap=True)
    t.add_column("seconds", justify="right")
    t.add_column("details", overflow="fold")
    for r in results:
        t.add_row(r.name, "[green]PASS[/]" if r.passed else "[bold red]FAIL[/]", f"{r.time_s:.2f}", r.detail)
    return t
