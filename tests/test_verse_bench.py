"""Verse-Bench's layout (set*/<name>.json + <name>.jpg, set2's <name>.wav) read as prompt rows: the key mapping
against the items the test writes, what `soe generate RECIPE prompts=FOLDER` leaves evaluated by `soe eval OUT`,
`soe eval --prompts FOLDER`, and a bad item (one line naming the file and key, exit 2, nothing written)."""
import json
import wave

import numpy as np
import pytest
from PIL import Image

from soe.cli import main
from soe.evaluate.run import plan
from soe.evaluate.verse_bench import read_items
from soe.sample.prompt_rows import read_rows

ITEMS = {  # (set, name): item in Verse-Bench's schema
    ("set1", "00001"): {"video_prompt": "A dog barks at a red ball.", "audio_prompt": ["Dog barking"],
                        "speech_prompt": {"speaker": "", "text": ""}},
    ("set2", "00023"): {"video_prompt": "Rain on a tin roof.", "audio_prompt": ["Rain", "thunder"],
                        "speech_prompt": {"speaker": "", "text": ""}},
    ("set3", "419"): {"video_prompt": "A man talks to the camera.", "audio_prompt": [""],
                      "speech_prompt": {"speaker": "Man", "text": "Hello there, how are you?"}},
}


@pytest.fixture
def bench(tmp_path):
    root = tmp_path / "verse_bench"
    rng = np.random.default_rng(0)
    for (s, name), item in ITEMS.items():
        (root / s).mkdir(parents=True, exist_ok=True)
        (root / s / f"{name}.json").write_text(json.dumps(item, indent=4))
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / s / f"{name}.jpg")
        if s == "set2":
            with wave.open(str(root / s / f"{name}.wav"), "wb") as w:
                w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(b"\0\0" * 1600)
    return root


def test_items_map_to_rows(bench):
    rows = read_items(bench)
    assert [r["id"] for r in rows] == ["00001", "00023", "419"]  # set1, set2, set3 in order
    for row in rows:
        item = ITEMS[(row["set"], row["id"])]
        folder = bench / row["set"]
        assert row["prompt"] == item["video_prompt"]
        assert row["image"] == str((folder / f"{row['id']}.jpg").resolve())
        assert row.get("audio_prompt") == (item["audio_prompt"][0] or None)
        speech = item["speech_prompt"]["text"] or None
        assert row.get("transcript") == speech and row.get("lyrics") == speech
        assert row.get("reference_audio") == (str((folder / f"{row['id']}.wav").resolve()) if row["set"] == "set2" else None)
    assert read_rows(bench) == rows  # `soe generate prompts=FOLDER` reads the same rows
    assert [r["id"] for r in read_items(bench / "set3")] == ["419"]  # one set folder alone


def test_generated_folder_is_evaluated_by_itself(bench, tmp_path):
    """What `soe generate RECIPE prompts=FOLDER out=OUT` leaves (<id>.mp4 per row + the rows in prompts.jsonl, written
    by its own write_rows; the generation itself is tests/test_eval_generate.py's) is what `soe eval OUT` needs."""
    from test_eval import make_clip

    from soe.sample.prompt_rows import write_rows

    out = tmp_path / "gen"
    rows = read_rows(bench)
    for row in rows:
        make_clip(out, row["id"])
    write_rows(rows, out)
    assert main(["eval", str(out), "--metrics", "av_align,clap_score,id_consistency,wer"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["clips"]) == {"00001", "00023", "419"}
    # each model metric found its field in the rows; only the weights are missing
    assert all("weights" in result["skipped"][m] for m in ("clap_score", "id_consistency", "wer"))


def test_eval_prompts_from_a_verse_bench_folder(bench, tmp_path):
    from test_eval import make_clip

    for name in ("00001", "419"):
        make_clip(tmp_path / "clips", name)
    p = plan(tmp_path / "clips", prompts=bench, metrics="av_align,wer", out=tmp_path / "e.json")
    assert p["rows"]["419"]["transcript"] == "Hello there, how are you?" and "transcript" not in p["rows"]["00001"]


def test_bad_item_is_one_line(bench, tmp_path, capsys):
    from test_eval import make_clip

    from soe.errors import RecipeError

    (bench / "set1" / "00002.json").write_text(json.dumps({"audio_prompt": ["x"]}))
    with pytest.raises(RecipeError) as e:  # what `soe generate prompts=FOLDER` reports (one line, exit status 2)
        read_rows(bench)
    assert "\n" not in str(e.value) and "sample.prompts" in str(e.value) and "00002.json" in str(e.value) and "video_prompt" in str(e.value)
    make_clip(tmp_path / "clips", "00001")
    assert main(["eval", str(tmp_path / "clips"), "--prompts", str(bench), "--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "00002.json" in err and "video_prompt" in err and not (tmp_path / "e.json").exists()
