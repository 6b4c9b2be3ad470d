"""One installed package: shipped recipes by name, `soe --version`, a start-up that imports no torch,
and one-line messages for features whose optional extra is missing."""
import subprocess
import sys
from importlib.metadata import entry_points, version

import pytest
import torch

import soe
from soe.cli import main
from soe.errors import RecipeError
from soe.recipe.reading import find_recipe, shipped_recipes


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"soe {version('soe')}"
    assert soe.__version__ == version("soe")


def test_shipped_recipes_resolve_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo = find_recipe("demo")
    assert demo == find_recipe("demo.yaml") == shipped_recipes()["demo"] and demo.parent.name == "recipes"
    assert {"demo", "universe1"} <= set(shipped_recipes())
    assert main(["inspect", "demo", "trainer.max_steps=1"]) == 0
    with pytest.raises(RecipeError, match="shipped recipes by name: .*demo"):
        find_recipe("dmeo")


def test_builtin_experts_install_under_soe():
    import soe.experts.wan

    assert soe.experts.wan.WanExpert is soe.get_expert("wan2.1")
    values = [ep.value for ep in entry_points(group="soe.experts")]
    builtins = [v for v in values if v.startswith("soe.experts.")]
    assert len(builtins) >= 5 and not any(v.startswith("experts.") for v in values)


def test_help_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom soe.cli import main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'timm', 'lightning', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path):
    import soe.extras
    from soe.media import contact_sheet

    monkeypatch.setattr(soe.extras, "has", lambda module: False)
    with pytest.raises(soe.extras.MissingExtraError) as info:
        contact_sheet(tmp_path / "x.png", torch.zeros(3, 2, 8, 8), 4.0, torch.zeros(1, 800), 800)
    assert str(info.value) == "contact sheets (PNG): not available without matplotlib (pip install 'soe[plots]')"
    assert not (tmp_path / "x.png").exists()


def test_listing_experts_imports_no_model_library(capsys):
    code = ("import sys, contextlib, io\nfrom soe.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['experts']) == 0\n"
            "print(sorted(m for m in ('diffusers', 'timm', 'peft', 'transformers', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert main(["experts", "--details"]) == 0  # depth, width, tokens/s of each real-size preset (built on meta)
    from rich.console import Console

    from soe.cli.tables import experts_table

    console = Console(width=200, record=True)
    console.print(experts_table([soe.get_expert("wan2.1")], details=True))
    row = next(line for line in console.export_text().splitlines() if "wan2.1" in line)
    assert [c.strip() for c in row.split("│")[1:6]] == ["wan2.1", "video", "30", "1536", "6.25"]  # 1.3B at 25 fps
