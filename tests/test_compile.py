"""Regional compilation of the stitched model (``sample.compile``): one graph per kind of block, no
recompilation after the first sampling step, same samples as eager.

The tiny UniVerse-1 fusion (tests/test_universe1.py: depth expansion, taps, attention key/value injection
on both sides) samples 6 steps with CFG. After step 1 the compiler's stance is ``fail_on_recompile`` (any
recompilation raises) and ``fail_on_recompile_limit_hit`` is on (a block that ran out of recompilations
would otherwise run eagerly without a word). Backend ``eager``: dynamo's guards and graph breaks are
the same whatever backend takes the graphs (checked by hand with ``aot_eager`` and ``inductor`` on CPU: same 12
graphs, same recompilations in step 1, none after), and it keeps this test at seconds.
"""
import functools

import pytest
import torch
from test_universe1 import fused

from soe.sample.sampler import sample_stitched
from soe.sample.speed import apply_speed
from soe.schema import SamplerConfig, SpeedConfig


@pytest.fixture
def eager_compile(monkeypatch):
    """``torch.compile`` with the eager backend; dynamo reset before and after; stance restored."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def _conditions(st):
    return {"a": st.a.conditioning(1, 1.0, torch.Generator().manual_seed(0)),
            "b": st.b.conditioning(1, 1.0, torch.Generator().manual_seed(1))}


def _sample_counting(st, cond, settings):
    from torch._dynamo.utils import counters

    graphs = {}

    def progress(i, n):
        graphs[i] = counters["stats"]["unique_graphs"]
        if i == 1:
            torch.compiler.set_stance("fail_on_recompile")  # from step 2 on, a recompilation raises

    out = sample_stitched(st, cond, 1.0, settings, progress=progress)
    torch.compiler.set_stance("default")
    return out, graphs


@pytest.mark.parametrize("speed", [{}, pytest.param({"cache": "first_block", "cache_threshold": 0.2}, marks=pytest.mark.slow),
                                   pytest.param({"memory": "offload_blocks"}, marks=pytest.mark.slow)],
                         ids=["plain", "step_cache", "offload_blocks"])
def test_fused_model_compiles_per_block_without_recompiling_after_the_first_step(eager_compile, speed):
    """Compiled sampling equals eager sampling under the same switches (the step cache's hooks wrap the
    compiled forwards and take the same decisions), with every graph made in the first step."""
    settings = SamplerConfig(steps=6, guidance={"a": 1.2, "b": 5.0})
    st_ref, _, _ = fused()
    cond = _conditions(st_ref)
    ref_setup = apply_speed(st_ref, SpeedConfig(compile=False, **speed), "cpu")
    ref = sample_stitched(st_ref, cond, 1.0, settings)
    st, _, _ = fused()  # the same model again (seeded)
    setup = apply_speed(st, SpeedConfig(compile=True, **speed), "cpu")
    got, graphs = _sample_counting(st, cond, settings)
    assert graphs[1] > 0  # the blocks really compiled
    assert graphs[6] == graphs[1]  # and no new graph after the first step (fail_on_recompile would have raised)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    if setup.cache is not None:
        assert setup.cache.stats == ref_setup.cache.stats and setup.cache.stats["skipped"] > 0
