"""`soe generate RECIPE prompts=FILE.jsonl`: one sample per row named by id, the rows copied beside them, and
`soe eval` on that folder finding them by itself; bad rows are one line, exit 2, no output folder."""
import json
from pathlib import Path

from soe.cli import main

TINY = Path(__file__).parents[1] / "tests" / "recipes" / "tiny.yaml"
ARGS = ["seconds=1", "seed=0", "steps=2", "data.seconds=1.0", "sample.decode=codec"]


def test_generate_one_sample_per_row_then_eval(tmp_path, capsys):
    rows = [{"id": "drum-01", "prompt": "a drum", "audio_prompt": "snare"}, {"id": "rain", "prompt": "rain on a roof"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen"
    assert main(["generate", str(TINY), f"prompts={tmp_path / 'p.jsonl'}", f"out={out}", *ARGS]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["drum-01.mp4", "drum-01.png", "drum-01.latents.safetensors", "rain.mp4", "rain.png", "rain.latents.safetensors", "prompts.jsonl"])
    assert [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()] == rows
    assert main(["eval", str(out), "--metrics", "av_align"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["clips"]) == {"drum-01", "rain"} and all(0 <= v["av_align"] <= 1 for v in result["clips"].values())


def test_bad_prompt_rows_are_one_line_and_make_no_folder(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "../b", "prompt": "y"}\n')
    out = tmp_path / "gen"
    assert main(["generate", str(TINY), f"prompts={tmp_path / 'p.jsonl'}", f"out={out}", *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.jsonl:2" in err and "id '../b'" in err
    assert not out.exists()
