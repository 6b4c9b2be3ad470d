"""soe-toy-audio: an example third-party soe expert (see ``expert.py``)."""
from soe_toy_audio.expert import ToyAudioDiT, ToyAudioExpert

__all__ = ["ToyAudioDiT", "ToyAudioExpert"]
