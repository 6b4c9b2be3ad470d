"""Hub repo ids as weight paths (soe/hub.py, soe/recipe/hub_paths.py), against a Hugging Face cache this
test builds itself in a temporary HF_HOME (``hub/models--org--name/refs/<rev>``, ``snapshots/<hash>/...``),
offline (``HF_HUB_OFFLINE=1``): the Hub is never contacted."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_bad_inputs import fails_cleanly

from soe.cli import main
from soe.hub import HubError, HubRef, parse_hub_id, resolve

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
PRETRAINED = ROOT / "recipes" / "pretrained"


def cache_repo(home: Path, repo_id: str, files: dict[str, Path], ref: str = "main") -> Path:
    """A snapshot of ``repo_id`` in the cache layout huggingface_hub writes; ``files``: path in repo -> source
    file or folder. Returns the snapshot folder."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for dst, src in files.items():
        (snap / dst).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, snap / dst, dirs_exist_ok=True)
        else:
            shutil.copy(src, snap / dst)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_ids_are_parsed_and_local_paths_win(tmp_path):
    assert parse_hub_id("Wan-AI/Wan2.1-T2V-1.3B-Diffusers") == HubRef("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    assert parse_hub_id("org/name@v1.0:transformer") == HubRef("org/name", "v1.0", "transformer")
    assert parse_hub_id("org/name@refs/pr/3") == HubRef("org/name", "refs/pr/3")
    assert parse_hub_id("org/name:sub/dir") == HubRef("org/name", None, "sub/dir")
    (tmp_path / "org" / "name").mkdir(parents=True)  # an existing folder is never a repo id (as in diffusers)
    for local in ("org/name", "./org/name", "/abs/folder", "~/models/x", "a/b/c", "runs/x/../y", "org/name:../../etc", None):
        assert parse_hub_id(local) is None, local
        assert resolve(local, "key") == local  # returned as given: local paths keep their own messages


def test_recipe_weight_paths_from_the_cache_with_revision_and_subfolder(hf_home):
    """experts.a.path as a repo id on main, experts.b.path at a revision and subfolder: the experts load
    the same tensors as from the local folders, and validation reads their depths from the snapshots."""
    from soe.recipe.builders import build_expert
    from soe.recipe.reading import load_recipe
    from soe.recipe.validate import validate_recipe

    cache_repo(hf_home, "soe-test/video-expert", {".": PRETRAINED / "video_expert"})
    cache_repo(hf_home, "soe-test/audio-expert", {"main-only.txt": DEMO}, ref="main")
    cache_repo(hf_home, "soe-test/audio-expert", {"experts/audio": PRETRAINED / "audio_expert"}, ref="v1")
    hub = load_recipe(DEMO, ["experts.a.path=soe-test/video-expert", "experts.b.path=soe-test/audio-expert@v1:experts/audio",
                             "experts.a.preset=null", "experts.b.preset=null"])  # depths only from the snapshots' config.json
    validate_recipe(hub)
    assert hub.experts.a.path == "soe-test/video-expert"  # the recipe keeps the repo id (run folders, model cards)
    local = load_recipe(DEMO)
    for side in ("a", "b"):
        got, want = build_expert(hub, side).state_dict(), build_expert(local, side).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), side


def test_uncached_repo_offline_is_one_line_naming_repo_and_env_var(hf_home, tmp_path, capsys):
    run = f"run_dir={tmp_path / 'run'}"
    err = fails_cleanly(["stitch", str(DEMO), "experts.a.path=nobody/missing-model", run], capsys, tmp_path,
                        "experts.a.path: 'nobody/missing-model' is no local folder, and as a Hub repo it is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in err
    cache_repo(hf_home, "soe-test/video-expert", {".": PRETRAINED / "video_expert"})
    fails_cleanly(["stitch", str(DEMO), "experts.a.path=soe-test/video-expert@v9", run], capsys, tmp_path,
                  "experts.a.path: 'soe-test/video-expert@v9' is no local folder, and as a Hub repo it is not in")
    fails_cleanly(["stitch", str(DEMO), "experts.a.path=soe-test/video-expert:nothing-here", run], capsys, tmp_path,
                  "experts.a.path: Hub repo 'soe-test/video-expert' has no folder 'nothing-here'")
    for key in ("codec_path", "text_encoder_path", "lora.init_from"):
        fails_cleanly(["stitch", str(DEMO), f"experts.a.{key}=nobody/missing-{key.replace('.', '-')}", run],
                      capsys, tmp_path, f"experts.a.{key}: 'nobody/missing-")
    # `soe inspect` loads nothing: an uncached repo falls back to the preset, as a missing local folder does
    assert main(["inspect", str(DEMO), "experts.a.path=nobody/missing-model", "--no-cache"]) == 0
    capsys.readouterr()
    fails_cleanly(["inspect", str(DEMO), "experts.a.path=nobody/missing-model", "experts.a.preset=null", "--no-cache"], capsys,
                  tmp_path, "experts.a.path: 'nobody/missing-model' is no local folder")


def test_an_expert_fetches_only_the_files_its_key_needs():
    """A Wan pipeline repo given as experts.a.path fetches transformer/ and not the umT5-XXL text encoder;
    as text_encoder_path, the encoder and tokenizer and not the transformer (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    from soe import get_expert

    repo = ["model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
            "text_encoder/config.json", "text_encoder/model-00001-of-00005.safetensors", "tokenizer/spiece.model",
            "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "examples/i2v_input.JPG"]
    files = get_expert("wan2.1").hub_files
    fetched = {key: set(filter_repo_objects(repo, allow_patterns=list(files[key]))) for key in files}
    assert {f.split("/")[0] for f in fetched["path"]} == {"transformer"}
    assert {f.split("/")[0] for f in fetched["codec_path"]} == {"vae"}
    assert {f.split("/")[0] for f in fetched["text_encoder_path"]} == {"text_encoder", "tokenizer"}


def test_convert_takes_a_hub_repo_id(hf_home, tmp_path):
    from test_universe1 import _write_release, fused

    st, _, _ = fused()
    src, _ = _write_release(tmp_path, st)
    cache_repo(hf_home, "soe-test/universe1", {"transformer": src, "README.md": DEMO}, ref="v1")
    assert main(["convert", "universe1", "soe-test/universe1@v1:transformer", str(tmp_path / "hub"), "--every", "1"]) == 0
    assert main(["convert", "universe1", str(src), str(tmp_path / "local"), "--every", "1"]) == 0
    for f in sorted((tmp_path / "local").iterdir()):
        assert (tmp_path / "hub" / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(HubError, match="convert SRC: 'soe-test/universe1' is no local folder, and as a Hub repo it is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve("soe-test/universe1", "convert SRC")  # main was never cached, only v1
    assert json.loads((tmp_path / "hub" / "universe1.json").read_text())["fused_blocks"] == 4
