"""Synchformer (Iashin et al., ICASSP 2024), the audio-video offset classifier behind DeSync, written for soe.

It is on no package index, so its three parts are written here, state-dict-compatible with the
``synchformer_state_dict.pth`` that av-benchmark (hkchengrex/av-benchmark) publishes: ``video`` (Motionformer-style
ViT with divided space-time attention), ``audio`` (AST over log-mel spectrograms), ``model`` (the offset
transformer and the whole model), ``preprocess`` (frames, mels, segments as av-benchmark prepares them) and
``config`` (the sizes; defaults are the published model's). ``soe.evaluate.desync`` turns it into a metric.
"""
from soe.evaluate.synchformer.config import SynchformerConfig
from soe.evaluate.synchformer.model import WEIGHTS, Synchformer

__all__ = ["Synchformer", "SynchformerConfig", "WEIGHTS"]
