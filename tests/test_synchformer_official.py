"""soe's Synchformer gives av-benchmark's numbers, checked against the OFFICIAL code on tiny random weights.

Skipped unless ``SOE_AV_BENCHMARK_CODE`` points at a checkout of hkchengrex/av-benchmark (never vendored here).
The official ``Synchformer`` is built at a tiny width (32, one layer each, 2 heads; the real segment geometry:
224 px, 16-frame segments, 66 mel frames, 14 segments per window) by shrinking the sizes its constructors read
(the Motionformer YAML, ``ASTConfig``, the hard-wired 768 of the offset transformer); every parameter is then
drawn at random, saved as ``synchformer/synchformer_state_dict.pth`` + ``config.json`` and loaded by soe strictly.
Compared (float32, CPU): video features of random frames (av-benchmark's ``encode_video_with_sync``), audio
features of a random waveform (its ``encode_audio_with_sync``, mel spectrogram by torchaudio when it imports, else
librosa with the same parameters), the offset logits of DeSync's first and last 14 segments, and the predicted
offsets. Shims, applied only here: transformers >= 5 lacks helpers the official AST file imports
(pruning, docstring decorators, ``get_head_mask``); they are added back with the same behaviour (no head mask).

    SOE_AV_BENCHMARK_CODE=/path/to/av-benchmark python -m pytest -q -s tests/test_synchformer_official.py
"""
import ast
import functools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

CODE = os.environ.get("SOE_AV_BENCHMARK_CODE")
pytestmark = pytest.mark.skipif(not CODE, reason="set SOE_AV_BENCHMARK_CODE to a hkchengrex/av-benchmark checkout")
D, HEADS = 32, 2


def _shim_transformers():
    import transformers.pytorch_utils as pu
    import transformers.utils as tu

    pu.find_pruneable_heads_and_indices = getattr(pu, "find_pruneable_heads_and_indices", None)
    pu.prune_linear_layer = getattr(pu, "prune_linear_layer", None)
    passthrough = lambda *a, **k: (lambda f: f)
    for name in ("add_code_sample_docstrings", "add_start_docstrings", "add_start_docstrings_to_model_forward"):
        if not hasattr(tu, name):
            setattr(tu, name, passthrough)


def _official_module():
    _shim_transformers()
    if CODE not in sys.path:
        sys.path.insert(0, CODE)
    import av_bench.synchformer.hf_src.modeling_ast as hf_ast
    import av_bench.synchformer.synchformer as sf

    if not hasattr(hf_ast.ASTPreTrainedModel, "get_head_mask"):
        hf_ast.ASTPreTrainedModel.get_head_mask = lambda self, head_mask, n: [None] * n
    return sf


def _official_tiny(monkeypatch):
    """The official Synchformer class with every size it reads shrunk (undone after the test)."""
    sf = _official_module()
    import av_bench.synchformer.ast as ast_mod
    import av_bench.synchformer.motionformer as mf
    import av_bench.synchformer.transformer as tr
    from transformers import ASTConfig

    load = mf.OmegaConf.load

    def tiny_yaml(path):
        cfg = load(path)
        cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS = D, 1, HEADS
        return cfg

    monkeypatch.setattr(mf, "OmegaConf", types.SimpleNamespace(load=tiny_yaml))
    monkeypatch.setattr(ast_mod, "ASTConfig",
                        lambda: ASTConfig(hidden_size=D, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=48))
    shrink = lambda n: D if n == 768 else n  # the offset transformer and the projections hard-wire 768
    nn = types.SimpleNamespace(**{k: getattr(torch.nn, k) for k in dir(torch.nn) if not k.startswith("_")})
    nn.Linear = lambda i, o, *a, **k: torch.nn.Linear(shrink(i), shrink(o), *a, **k)
    for mod in (sf, tr):
        monkeypatch.setattr(mod, "nn", nn)
    monkeypatch.setattr(tr, "RandInitPositionalEncoding",
                        functools.partial(lambda cls, block_shape, n_embd: cls(block_shape, shrink(n_embd)), tr.RandInitPositionalEncoding))
    gt = tr.GlobalTransformer
    monkeypatch.setattr(sf, "GlobalTransformer", lambda **kw: gt(**{**kw, "n_layer": 1, "n_head": HEADS, "n_embd": D}))
    return sf


def test_full_size_state_dict_names_and_shapes():
    """The published model's parameter names and shapes (official class at full size, parameters on the meta device)
    are soe's."""
    from accelerate import init_empty_weights

    from soe.evaluate.synchformer import Synchformer

    sf = _official_module()
    with init_empty_weights():
        official = {k: tuple(v.shape) for k, v in sf.Synchformer().state_dict().items()}
        mine = {k: tuple(v.shape) for k, v in Synchformer().state_dict().items()}
    assert sorted(official) == sorted(mine)
    assert official == mine


def _official_function(relpath: str, name: str, **env):
    """One top-level function of an official file, compiled from the checkout (its module imports GPU-only packages)."""
    source = (Path(CODE) / relpath).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(env)
    exec(compile(ast.Module([node], []), relpath, "exec"), scope)
    return scope[name]


def _mel():
    try:
        import torchaudio

        return torchaudio.transforms.MelSpectrogram(sample_rate=16000, win_length=400, hop_length=160, n_fft=1024, n_mels=128)
    except ImportError:
        import librosa

        def mel(x):  # torchaudio's defaults: periodic Hann, centred reflect padding, power 2, HTK, no norm
            m = librosa.feature.melspectrogram(y=x.numpy(), sr=16000, n_fft=1024, hop_length=160, win_length=400,
                                               window="hann", center=True, pad_mode="reflect", power=2.0, n_mels=128,
                                               fmin=0.0, fmax=8000.0, htk=True, norm=None)
            return torch.from_numpy(m).float()
        return mel


def test_frames_prepared_as_official():
    """Resize/crop/normalise of frames: av-benchmark's own ``VideoDataset.sync_transform`` (torchvision v2; the module's
    torio import stubbed, it only decodes) against soe's torch version, on odd frame sizes."""
    pytest.importorskip("torchvision")
    from soe.evaluate.synchformer import preprocess as pre

    sys.modules.setdefault("torio", types.ModuleType("torio"))
    sys.modules.setdefault("torio.io", types.SimpleNamespace(StreamingMediaDecoder=None))
    if CODE not in sys.path:
        sys.path.insert(0, CODE)
    from av_bench.data.video_dataset import VideoDataset

    transform = VideoDataset([], duration_sec=8.0).sync_transform
    rng = np.random.default_rng(0)
    worst = 0.0
    for h, w in ((240, 416), (480, 832), (300, 200), (224, 224), (123, 457)):
        frames = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        official = transform(torch.from_numpy(frames).permute(0, 3, 1, 2))  # (T, C, H, W) uint8, as torio gives
        mine = pre.resize_crop(frames)
        assert official.shape == mine.shape == (3, 3, 224, 224)
        worst = max(worst, float((official - mine).abs().max()))
    print(f"\nframes: max |diff| {worst:.3g} (one uint8 step is {2 / 255:.3g})")
    assert worst < 1e-5


def test_matches_official(tmp_path, monkeypatch):
    from soe.evaluate.desync import windows
    from soe.evaluate.synchformer import Synchformer, SynchformerConfig
    from soe.evaluate.synchformer import preprocess as pre

    sf = _official_tiny(monkeypatch)
    torch.manual_seed(0)
    official = sf.Synchformer().eval()
    g = torch.Generator().manual_seed(1)
    norms = {f"{n}.weight" for n, m in official.named_modules() if isinstance(m, torch.nn.LayerNorm)}

    def draw(k, v):  # layer-scaled, so activations stay O(1) and the offset depends on the inputs
        x = torch.randn(v.shape, generator=g)
        if k in norms:
            return 1 + 0.1 * x
        if k.endswith("weight") and v.ndim > 1:
            return x / v[0].numel() ** 0.5
        return x * (0.5 if v.ndim > 1 else 0.1)  # tokens and position tables; biases

    state = {k: draw(k, v) for k, v in official.state_dict().items()}
    official.load_state_dict(state)
    folder = tmp_path / "synchformer"
    folder.mkdir()
    torch.save(state, folder / "synchformer_state_dict.pth")
    cfg = SynchformerConfig(dim=D, video_depth=1, video_heads=HEADS, audio_depth=1, audio_heads=HEADS, audio_intermediate=48,
                            sync_layers=1, sync_heads=HEADS)
    (folder / "config.json").write_text(cfg.to_json())
    mine = Synchformer.from_folder(folder)  # strict: same names and shapes

    from einops import rearrange

    enc_v = _official_function("extract_video.py", "encode_video_with_sync", torch=torch, rearrange=rearrange,
                               Synchformer=sf.Synchformer)
    torchaudio_stub = types.SimpleNamespace(transforms=types.SimpleNamespace(MelSpectrogram=object))
    pad = _official_function("av_bench/data/audio_dataset.py", "pad_or_truncate", torch=torch,
                             log=types.SimpleNamespace(warning=lambda *a: None))
    enc_a = _official_function("av_bench/extract.py", "encode_audio_with_sync", torch=torch, Synchformer=sf.Synchformer,
                               torchaudio=torchaudio_stub, pad_or_truncate=pad)
    seconds = 5.2  # 130 frames -> 15 segments: the first and last 14 differ
    frames = torch.rand(1, int(25 * seconds), 3, 224, 224, generator=g) * 2 - 1
    wave = torch.randn(1, int(16000 * seconds), generator=g) * 0.1
    with torch.inference_mode():
        v_off = enc_v(official, frames)  # (1, S, 8, D)
        a_off = enc_a(official, wave, _mel())  # (1, S, 6, D)
        v_me = mine.video_features(pre.segment(frames[0], pre.SEG_FRAMES, pre.STEP_FRAMES))[None]
        a_me = mine.audio_features(pre.log_mels(pre.segment(wave[0], pre.SEG_SAMPLES, pre.STEP_SAMPLES)))[None]
        grid = sf.make_class_grid(-2, 2, 21)
        logit_diff, off_official, off_mine, logits = 0.0, [], [], []
        for w_off, w_me in zip((slice(None, 14), slice(-14, None)), windows(v_me.shape[1], 14)):
            lo = official.compare_v_a(v_off[:, w_off], a_off[:, w_off])
            lm = mine.offset_logits(v_me[:, w_me], a_me[:, w_me])
            logit_diff = max(logit_diff, float((lo - lm).abs().max()))
            logits.append(lo)
            off_official.append(grid[lo.argmax(-1)].item())
            off_mine.append(float(mine.class_grid()[lm.argmax(-1)]))
    dv, da = float((v_off - v_me).abs().max()), float((a_off - a_me).abs().max())
    print(f"\nmax |diff|: video features {dv:.3g} (scale {float(v_off.abs().max()):.3g}), audio features {da:.3g} "
          f"(scale {float(a_off.abs().max()):.3g}), offset logits {logit_diff:.3g} (scale {float(logits[0].abs().max()):.3g}, the two windows differ by {float((logits[0] - logits[1]).abs().max()):.3g}); offsets official {off_official} soe {off_mine}")
    assert v_off.shape == v_me.shape and a_off.shape == a_me.shape and v_off.shape[1] == 15
    assert dv < 1e-4 and da < 1e-3 and logit_diff < 1e-4
    assert off_official == off_mine
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3  # the windows differ, so the comparison sees the inputs
