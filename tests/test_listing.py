"""`soe experts` lists from the plugins' torch-free descriptions (soe/plugin/listing.py): soe's own equal their
classes, a plugin without one (or with a broken one) is still listed from its class, and
`soe experts check` fails when a description drifts from its class."""
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import soe.plugin.listing
from soe import get_expert
from soe.plugin.listing import ExpertListing, declared_info, listings
from soe.testing import run_check

ROOT = Path(__file__).parents[1]


def test_every_builtin_expert_is_described_exactly_as_its_class():
    builtins = {ep.name for ep in entry_points(group="soe.experts") if ep.value.startswith("soe.experts.")}
    described = {ep.name for ep in entry_points(group="soe.experts.info")}
    assert builtins and builtins <= described
    for name in builtins:
        assert declared_info(name) == ExpertListing.of_class(get_expert(name)), name
    names = [r.name for r in listings()]
    assert names == sorted(set(names)) and builtins <= set(names)


def test_a_plugin_without_or_with_a_broken_description_is_listed_from_its_class(tmp_path):
    (tmp_path / "fakeplug.py").write_text(textwrap.dedent('''
        from soe.experts.wan import WanExpert

        class PlainExpert(WanExpert):
            name, modality, source = "fake-plain", "video", "fakeplug.Model"
            presets = {"big": {}, "tiny": {}}

        class BrokenExpert(PlainExpert):
            name = "fake-broken"

        NOT_A_DICT = ["video"]
    '''))
    dist = tmp_path / "fakeplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[soe.experts]\nfake-plain = fakeplug:PlainExpert\nfake-broken = fakeplug:BrokenExpert\n\n"
                                           "[soe.experts.info]\nfake-broken = fakeplug:NOT_A_DICT\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "soe", "experts", "--no-cache"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in proc.stdout.splitlines() if "│" in line}
    assert rows["fake-plain"] == ["video", "big, tiny", "fakeplug.Model", "fakeplug"]
    assert rows["fake-broken"] == ["video", "big, tiny", "fakeplug.Model", "fakeplug"]
    assert rows["wan2.1"] == ["video", "1.3b, 14b, tiny", "diffusers.WanTransformer3DModel", "soe.experts.wan"]


def test_the_contract_check_fails_when_a_description_drifts(monkeypatch):
    assert run_check("attributes", "wan2.1").passed
    drifted = ExpertListing("wan2.1", "video", ("1.3b", "tiny"), "diffusers.WanTransformer3DModel", "soe.experts.wan")
    monkeypatch.setattr(soe.plugin.listing, "declared_info", lambda name: drifted if name == "wan2.1" else None)
    result = run_check("attributes", "wan2.1")
    assert not result.passed and "'presets': ['1.3b', 'tiny']" in result.detail and "'1.3b', '14b', 'tiny'" in result.detail
