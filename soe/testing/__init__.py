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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module

import torch

from soe.errors import SoeError
from soe.plugin.expert import Expert
from soe.plugin.registry import list_experts
from soe.testing.checks import CHECKS, ContractFailure


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
    from soe.plugin.registry import UnknownExpertError, get_expert

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
    except ContractFailure as e:
        detail, passed = str(e), False
    except Exception as e:  # a crash is a failed property too; say where
        detail, passed = f"raised {type(e).__name__}: {e}", False
    return CheckResult(name, passed, detail, time.perf_counter() - start)


def check_expert(expert, checks: Sequence[str] | None = None, partner: str | None = "auto", seed: int = 0) -> list[CheckResult]:
    """Run the contract checks on an Expert class, registered name, ``module:Class`` or tiny instance."""
    unknown = [c for c in checks or () if c not in CHECKS]
    if unknown:
        raise ExpertSpecError(f"unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    if partner not in (None, "auto") and partner not in list_experts():  # else the stitch check "fails" on a typo
        raise ExpertSpecError(f"--partner: unknown expert {partner!r}; known experts: {', '.join(list_experts())}")
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
