"""Mistakes made through the Python API are soe errors too: one line naming what was expected, and still
the built-in type callers may already catch (RuntimeError, FileNotFoundError, ValueError)."""
import pytest
import torch
from conftest import batch_for, tiny

from soe import Stitcher, get_expert
from soe.errors import CheckpointNotFoundError, SoeError, UnstitchedError
from soe.recipe.reading import load_recipe
from soe.schema import RecipeError


def test_running_an_unstitched_stitcher_says_to_restitch():
    a, b = tiny("wan2.1"), tiny("ace-step-1.5")
    st = Stitcher(a, b, pairs="linear", direction="a_to_b")
    st.unstitch()
    with pytest.raises(UnstitchedError, match=r"called after unstitch\(\).*call restitch\(\) first") as info:
        st(batch_for(a), batch_for(b))
    assert isinstance(info.value, SoeError) and isinstance(info.value, RuntimeError) and "\n" not in str(info.value)
    st.restitch()
    with torch.no_grad():
        st(batch_for(a), batch_for(b))  # runs again


@pytest.mark.parametrize("name,expected", [("wan2.1", "transformer/config.json"), ("ace-step", "ace_step_transformer/config.json")])
def test_loading_an_expert_from_a_missing_folder_names_the_files_expected(tmp_path, name, expected):
    with pytest.raises(CheckpointNotFoundError, match=expected) as info:
        get_expert(name).load(tmp_path / "nowhere")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, SoeError) and "nowhere" in str(info.value)


def test_a_recipe_given_as_a_dict_says_what_is_expected():
    from soe.cli.stitch import run_training

    for call in (lambda: run_training({"name": "x"}), lambda: load_recipe({"name": "x"})):
        with pytest.raises(RecipeError, match="recipe: expected a YAML file path or the name of a shipped recipe .* got a dict"):
            call()
