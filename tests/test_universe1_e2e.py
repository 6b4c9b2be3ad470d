"""UniVerse-1 end to end over folders in each family's official layout (tiny, random weights).

    wan/  transformer/ vae/ text_encoder/ tokenizer/                          (diffusers Wan2.1 folder)
    ace/  ace_step_transformer/ music_dcae_f8c8/ music_vocoder/ umt5-base/ vocab.json   (ACE-Step v1 root)

H.264 + AAC clips written here -> ``soe encode recipes/universe1.yaml`` -> ``soe stitch`` (2 steps)
-> ``soe generate`` with a text prompt -> an mp4 whose sound is the ACE-Step vocoder's decoding of
the generated audio latents. Only the sizes and the step counts are overridden; every folder is
read the way the real checkpoints are.
"""
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_encode import WORDS, make_clip, tiny_umt5_folder

from soe import get_expert
from soe.cli import main
from soe.data.stream_read import load_cache

RECIPE = str(Path(__file__).parents[1] / "recipes" / "universe1.yaml")


def wan_folder(root: Path) -> Path:
    from soe.experts.codecs import WanVideoCodec

    wan = get_expert("wan2.1").tiny()
    wan.save(root)  # transformer/
    WanVideoCodec.tiny(wan.model.config.in_channels, 25.0, seed=1).vae.save_pretrained(root / "vae")
    _, tok, enc = tiny_umt5_folder(root, wan.model.config.text_dim, WORDS)
    enc.save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return root


def ace_folder(root: Path) -> Path:
    from tokenizers import Tokenizer, models

    from soe.experts.ace_step_v1_codec import MusicCodec

    ace = get_expert("ace-step").tiny()
    ace.save(root)  # ace_step_transformer/
    MusicCodec.tiny(seed=2).save(root)  # music_dcae_f8c8/, music_vocoder/
    _, tok, enc = tiny_umt5_folder(root, ace.model.config.text_embedding_dim, WORDS)
    enc.save_pretrained(root / "umt5-base")
    tok.save_pretrained(root / "umt5-base")
    lyric = Tokenizer(models.BPE({c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}, []))
    lyric.add_special_tokens(["[en]", "[SPACE]"])
    lyric.save(str(root / "vocab.json"))
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("universe1")
    wan, ace = wan_folder(root / "wan"), ace_folder(root / "ace")
    clips = root / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", seconds=2.1)  # H.264 + AAC, 48 kHz stereo
    (clips / "a.txt").write_text("a white square slides while a tone rises")
    make_clip(clips / "b.mp4", seconds=1.2, sr=44100, layout="mono")
    (clips / "b.txt").write_text("a wide clip hum")
    overrides = [
        f"experts.a.path={wan}", f"experts.b.path={ace}",  # codec and text encoder folders follow (the recipe's ${.path})
        "experts.a.preset=tiny", "experts.b.preset=tiny",  # the architecture of these folders (soe encode builds it on meta)
        "experts.a.options={fps: 25, height: 64, width: 64}",
        "experts.a.dtype=float32", "experts.b.dtype=float32",
        "experts.a.lora={r: 4, alpha: 4}", "experts.b.lora={r: 4, alpha: 4}",
        "stitch.depth.every=1",  # tiny: 2 ACE-Step blocks expanded to Wan's 4
        f"data.path={root / 'cache'}", "data.seconds=1.0", "data.num_workers=0",
        f"run_dir={root / 'run'}", "optim.warmup_steps=0",
        "trainer.max_steps=2", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
        "trainer.precision=32", "trainer.accumulate_grad_batches=1", "trainer.log_every_n_steps=1",
        "trainer.checkpoint_every_n_steps=2",
    ]
    return root, clips, overrides


@pytest.mark.slow
def test_clips_to_mp4_through_official_layout_folders(setup, capsys):
    from soe.experts.ace_step_v1_codec import MusicCodec
    from soe.media import aac_rate, resample_audio

    root, clips, overrides = setup
    assert main(["encode", RECIPE, str(clips), *overrides]) == 0
    _, _, clips_cached = load_cache(root / "cache")  # every window of the streamed cache, in index order
    assert len(clips_cached) == 3  # two one-second windows of a.mp4, one of b.mp4
    for clip in clips_cached:  # the same window: as many audio latents as video latent frames (1 s = 25 frames = 1 + 4 * 6)
        assert clip["a"]["latents"].shape[1] == clip["b"]["latents"].shape[-1] == 7
        assert clip["b"]["lyric_mask"].sum() == 32 and not clip["b"]["lyric_token_ids"].any()  # UniVerse-1's "no speech"

    assert main(["stitch", RECIPE, *overrides]) == 0
    trained = root / "run" / "trained"
    assert (trained / "connectors.safetensors").is_file()

    out = root / "samples"
    assert main(["generate", RECIPE, *overrides, f"ckpt={root / 'run'}", "prompt=a white square slides", "seconds=1.0",
                 "steps=2", f"out={out}"]) == 0
    mp4 = out / "sample_00.mp4"
    with av.open(str(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(mp4)) as c:
        rate = c.streams.audio[0].rate
        sound = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)  # (2, N)
    assert len(frames) == 25 and frames[0].shape == (64, 64, 3)  # 7 latent frames = 1 + 4 * 6 frames

    # the sound is the vocoder's decoding of the generated audio latents (AAC-coded at the next AAC rate)
    latents = load_file(out / "latents.safetensors")["b/latents"]
    codec = MusicCodec.load(root / "ace", sample_rate=25600)

    def decoded(z):
        with torch.no_grad():
            return resample_audio(codec.decode(z)[0].float(), 25600, aac_rate(25600)).numpy()  # (2, N)

    ref = decoded(latents)
    other = MusicCodec.tiny(sample_rate=25600, seed=7)  # another vocoder: the sound must not match its decoding
    with torch.no_grad():
        other = resample_audio(other.decode(latents)[0].float(), 25600, aac_rate(25600)).numpy()
    assert rate == aac_rate(25600) and abs(sound.shape[1] - ref.shape[1]) <= 2048
    n = min(sound.shape[1], ref.shape[1])
    for ch in range(2):
        s, r, o = sound[ch, 1024: n - 1024], ref[ch, 1024: n - 1024], other[ch, 1024: n - 1024]  # codec edges
        corr, corr_other = float(np.corrcoef(s, r)[0, 1]), float(np.corrcoef(s, o)[0, 1])
        assert corr > 0.75 and corr > corr_other + 0.3 and np.abs(r).max() > 1e-4, (ch, corr, corr_other)


@pytest.mark.slow
def test_a_text_encoder_of_the_other_expert_is_one_line(setup, capsys):
    root, _, overrides = setup
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    # ACE-Step's umT5-base (768 wide) where Wan's umT5 (here 32 wide) belongs
    swapped = [*overrides, f"experts.a.text_encoder_path={root / 'ace' / 'umt5-base'}", "data.kind=synthetic", "data.path=null"]  # no cache needed here
    assert main(["generate", RECIPE, *swapped, "prompt=a hum", "steps=1", f"out={root / 'bad'}"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (transformers' load bar aside)
    assert len(errors) == 1 and errors[0].startswith("error: experts.a.text_encoder_path") and "768 wide" in errors[0], errors
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
