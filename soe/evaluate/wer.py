"""``wer``: word error rate of the Whisper transcription of a speech clip against its transcript.

transformers' ``WhisperForConditionalGeneration`` + ``WhisperProcessor`` from a local folder transcribe the
mono track at 16 kHz (the first 30 s: Whisper's window). The text normalisation is Verse-Bench's
(``wer_inferencer.py``): both strings stripped and lower-cased, punctuation kept, and a transcription made
of punctuation only counts as empty; jiwer's ``wer(reference, hypothesis)`` scores it. Verse-Bench
transcribes with SenseVoice; this uses Whisper, so its WER numbers are comparable only in definition,
not in value.

Hand-written: the normalisation (three lines, stated above); the edit distance is jiwer's.
"""
from __future__ import annotations

import string

import numpy as np
import torch

SAMPLE_RATE = 16_000


def normalise(text: str) -> str:
    """Verse-Bench's normalisation: strip, lower-case; punctuation only -> ''."""
    text = text.strip()
    return "" if set(text) <= set(string.punctuation) else text.lower()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """jiwer WER of normalised strings; an empty reference gives 0.0 for an empty hypothesis, else 1.0."""
    import jiwer

    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


class WhisperTranscriber:
    def __init__(self, folder, device: str = "cpu", max_new_tokens: int = 200):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.model = WhisperForConditionalGeneration.from_pretrained(folder).to(device).eval()
        self.processor = WhisperProcessor.from_pretrained(folder)
        self.device, self.max_new_tokens = device, max_new_tokens

    @torch.no_grad()
    def transcribe(self, mono_16k: np.ndarray) -> str:
        inputs = self.processor.feature_extractor(np.asarray(mono_16k, np.float32), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        budget = min(self.max_new_tokens, self.model.config.max_target_positions - 4)  # room for the start tokens
        ids = self.model.generate(inputs.input_features.to(self.device), max_new_tokens=budget, do_sample=False)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0]
