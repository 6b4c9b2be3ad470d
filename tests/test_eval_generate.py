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


def test_sample_eval_logs_av_align_of_each_render(tmp_path):
    from rich.console import Console

    from soe.cli.stitch import run_training

    run = tmp_path / "run"
    run_training(TINY, ["data.num_clips=8", "data.batch_size=4", "data.seconds=1.0", "trainer.max_steps=2", f"run_dir={run}",
                        "sample.every_n_steps=1", "sample.steps=2", "sample.eval=[av_align]", "trainer.log_every_n_steps=1"],
                 console=Console(file=open("/dev/null", "w")), progress=False)
    logged = "".join(p.read_text() for p in run.rglob("metrics.csv"))
    assert "eval/av_align" in logged.splitlines()[0]
    values = [float(x) for line in logged.splitlines()[1:] for x in [line.split(",")[logged.splitlines()[0].split(",").index("eval/av_align")]] if x]
    assert len(values) == 2 and all(0 <= v <= 1 for v in values)


def test_sample_eval_names_only_weight_free_metrics(tmp_path, capsys):
    assert main(["stitch", str(TINY), "sample.eval=[clap_score]", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sample.eval" in err and "clap_score" in err
