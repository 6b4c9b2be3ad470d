"""`soe eval`'s model-based metrics through their real loading path: tiny random-weight CLAP, CLIP, DINOv2 and
Whisper models saved with ``save_pretrained`` (tokenizer/processor files made here), read back from a
``--models`` folder. Values are checked against direct transformers computations of each definition, for
ranges and for determinism; the Frechet distance against a direct eigenvalue computation; WER on known strings."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import make_clip

from soe.cli.commands import main
from soe.evaluate.clap import SAMPLE_RATE as CLAP_RATE
from soe.evaluate.clap import ClapEmbedder, prepare_audio
from soe.evaluate.clip_score import ClipScorer, frame_indices
from soe.evaluate.dino import DinoEmbedder
from soe.evaluate.frechet import frechet_distance
from soe.evaluate.wer import WhisperTranscriber, normalise, word_error_rate

FRAMES = np.random.default_rng(0).integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)


def bpe_files(folder: Path, specials: list[str], word_suffix: bool = False) -> tuple[str, str, int]:
    """A byte-level BPE vocabulary of single characters (no merges): every string tokenises."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + chars + ([c + "</w>" for c in chars] if word_suffix else [])))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt"), len(vocab)


def save_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer(*bpe_files(folder.parent / "clip_tok", ["<|startoftext|>", "<|endoftext|>"], word_suffix=True)[:2])
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)).save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)


def save_dino(folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=37)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def save_clap(folder: Path) -> None:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    tok = RobertaTokenizer(*bpe_files(folder.parent / "clap_tok", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])[:2])
    torch.manual_seed(0)
    ClapModel(ClapConfig(  # fused, like LAION's 630k-audioset-fusion checkpoint; 2 s windows instead of 10 s
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         max_position_embeddings=80, pad_token_id=tok.pad_token_id, projection_dim=16),
        audio_config=dict(spec_size=128, num_mel_bins=64, window_size=4, patch_size=4, patch_stride=4, patch_embeds_hidden_size=16,
                          hidden_size=32, depths=[1, 1], num_attention_heads=[2, 2], num_hidden_layers=2, enable_fusion=True,
                          projection_dim=16),
        projection_dim=16)).save_pretrained(folder)
    fe = ClapFeatureExtractor(feature_size=64, sampling_rate=CLAP_RATE, hop_length=480, max_length_s=2, fft_window_size=1024)
    ClapProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(folder)


def save_whisper(folder: Path) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer

    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>"]
    vocab, merges, n = bpe_files(folder.parent / "whisper_tok", specials)
    tok = WhisperTokenizer(vocab, merges)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    ids = {s: tok.convert_tokens_to_ids(s) for s in specials}
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=n, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_target_positions=64, pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], decoder_start_token_id=ids["<|startoftranscript|>"]))
    model.generation_config.no_timestamps_token_id = ids["<|notimestamps|>"]
    model.save_pretrained(folder)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for name, save in (("clip", save_clip), ("dino", save_dino), ("clap", save_clap), ("whisper", save_whisper)):
        save(root / name)
    return root


def test_clip_score_is_torchmetrics_convention_on_a_direct_computation(models):
    scorer = ClipScorer(models / "clip")
    images = list(FRAMES[frame_indices(len(FRAMES))])
    seen = set()
    for prompt in ("a cat on a mat", "dog", "the sea at night", "x"):
        inputs = scorer.processor(text=[prompt], images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            img = scorer.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = scorer.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
        direct = 100 * torch.nn.functional.cosine_similarity(img, txt).mean().item()  # torchmetrics: mean, then max(., 0)
        value = scorer.score(FRAMES, prompt)
        assert value == pytest.approx(max(direct, 0.0), abs=1e-4) and 0 <= value <= 100
        assert scorer.score(FRAMES, prompt) == value
        seen.add(direct > 0)
    assert seen == {True, False}  # both sides of the clip at 0 were exercised


def test_dino_token_is_verse_bench_pipeline_output(models):
    from transformers import pipeline

    dino = DinoEmbedder(models / "dino")
    pipe = pipeline(model=str(models / "dino"), task="image-feature-extraction")
    for i in (0, 7):  # Verse-Bench: pipeline(image)[0][-2]
        np.testing.assert_allclose(dino.tokens([FRAMES[i]], -2)[0], np.array(pipe(Image.fromarray(FRAMES[i]))[0][-2]), atol=1e-5)
    ref = Image.fromarray(FRAMES[3])
    feats = np.array([pipe(Image.fromarray(f))[0][-2] for f in FRAMES])
    anchor = np.array(pipe(ref)[0][-2])
    direct = np.mean(feats @ anchor / (np.linalg.norm(feats, axis=1) * np.linalg.norm(anchor)))
    value = dino.id_consistency(ref, FRAMES)
    assert value == pytest.approx(direct, abs=1e-5) and -1 <= value <= 1
    assert dino.id_consistency(ref, FRAMES[3:4]) == pytest.approx(1.0, abs=1e-6)  # the reference itself
    assert dino.frame_embeddings(FRAMES).shape == (8, 32)


def test_clap_score_prepares_audio_as_verse_bench_and_is_deterministic(models):
    clap = ClapEmbedder(models / "clap")
    x = (np.random.default_rng(1).standard_normal(CLAP_RATE * 3) * 0.05).astype(np.float32)  # 3 s: longer than the window
    prepared = prepare_audio(x)
    assert np.abs(prepared).max() == pytest.approx(10 ** (-1 / 20), abs=1e-4)  # -1 dBFS peak
    assert np.allclose(prepared * 32767, np.round(prepared * 32767), atol=1e-3)  # on the 16-bit grid
    a1, a2 = clap.audio([x, x[: CLAP_RATE]]), clap.audio([x, x[: CLAP_RATE]])
    np.testing.assert_array_equal(a1, a2)  # the fused crops are seeded
    assert a1.shape == (2, 16) and np.allclose(np.linalg.norm(a1, axis=1), 1, atol=1e-5)
    inputs = clap.processor.feature_extractor([prepared[: CLAP_RATE]], sampling_rate=CLAP_RATE, return_tensors="pt")
    with torch.no_grad():
        direct = clap.model.get_audio_features(**inputs)
    direct = torch.nn.functional.normalize(getattr(direct, "pooler_output", direct), dim=-1).numpy()
    np.testing.assert_allclose(clap.audio([x[: CLAP_RATE]]), direct, atol=1e-5)  # 1 s: no random crop involved


def test_frechet_distance_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((200, 6)), rng.standard_normal((150, 6)) * 1.5 + 0.3
    assert abs(frechet_distance(x, x)) < 1e-6
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # tr sqrt(S1 S2) = sum of square roots of the eigenvalues of S1 S2 (real and >= 0 for covariance matrices)
    direct = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    assert frechet_distance(x, y) == pytest.approx(direct, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(x[:1], y)


def test_wer_of_known_strings_and_whisper_transcription(models):
    assert word_error_rate("the cat sat on the mat", "the cat sat on the mat") == 0.0
    assert word_error_rate("The cat sat", "the cat sat  ") == 0.0  # stripped and lower-cased
    assert word_error_rate("the cat sat on the mat", "the cat sit on mat") == pytest.approx(2 / 6)  # 1 sub + 1 del
    assert word_error_rate("hello world", "?!") == 1.0 and normalise(" ... ") == ""  # punctuation only = nothing heard
    whisper = WhisperTranscriber(models / "whisper", max_new_tokens=8)
    audio = (np.random.default_rng(0).standard_normal(16_000) * 0.1).astype(np.float32)
    text = whisper.transcribe(audio)
    assert isinstance(text, str) and "<|" not in text and whisper.transcribe(audio) == text


def test_eval_command_runs_every_metric_from_a_models_folder(models, tmp_path):
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    for stem, shift in (("a", 0.0), ("b", 0.3), ("c", 0.1)):
        make_clip(samples, stem, shift=shift)
        make_clip(reference, f"r{stem}", shift=0.0)
    Image.fromarray(FRAMES[0]).save(samples / "ref.png")
    rows = [{"id": "a", "prompt": "a square moves", "audio_prompt": "clicks", "image": "ref.png", "transcript": "click click"},
            {"id": "b", "prompt": "a square moves"}, {"id": "c", "prompt": "the sea at night"}]
    (samples / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", str(samples), "--models", str(models), "--reference", str(reference), "--out", str(tmp_path / "1.json")]) == 0
    r = json.loads((tmp_path / "1.json").read_text())
    assert set(r["skipped"]) == {"desync", "sync_offset"} and r["failed"] == {}  # no synchformer/: tests/test_synchformer.py
    assert set(r["clips"]["a"]) == {"av_align", "clap_score", "clip_score", "id_consistency", "wer"}
    assert set(r["clips"]["b"]) == {"av_align", "clap_score", "clip_score"}  # no image, no transcript
    for v in r["clips"].values():
        assert -1 <= v["clap_score"] <= 1 and 0 <= v["clip_score"] <= 100
    assert -1 <= r["clips"]["a"]["id_consistency"] <= 1 and r["clips"]["a"]["wer"] >= 0
    assert r["set"]["fd_audio"] >= -1e-6 and r["set"]["fd_video"] >= -1e-6
    assert set(r["models"]) == {"clap", "clip", "dino", "whisper"} and all(m["sha256"] for m in r["models"].values())
    # deterministic; and a set against itself is at distance ~0
    assert main(["eval", str(samples), "--models", str(models), "--reference", str(samples), "--out", str(tmp_path / "2.json")]) == 0
    r2 = json.loads((tmp_path / "2.json").read_text())
    assert r2["clips"] == r["clips"]
    assert abs(r2["set"]["fd_audio"]) < 1e-4 and abs(r2["set"]["fd_video"]) < 1e-4
