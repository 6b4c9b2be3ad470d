"""Torch-free descriptions of soe's built-in experts, for ``soe experts`` (see soe/plugin/listing.py).

Each dict repeats three class attributes of its expert (``modality``, the ``presets`` names in order,
``source``) so that listing the experts imports no plugin, hence no torch. They are registered in the
``soe.experts.info`` entry-point group under the expert's name; tests/test_listing.py and
``soe experts check`` assert that every one equals its class.
"""

WAN21 = {"modality": "video", "presets": ["1.3b", "14b", "tiny"], "source": "diffusers.WanTransformer3DModel"}
WAN22_TI2V = {"modality": "video", "presets": ["5b", "tiny"], "source": "diffusers.WanTransformer3DModel"}
ACE_STEP = {"modality": "audio", "presets": ["3.5b", "tiny"], "source": "soe.experts.ACEStepTransformer2DModel"}
ACE_STEP_15 = {"modality": "audio", "presets": ["base", "tiny"], "source": "diffusers.AceStepTransformer1DModel"}
STABLE_AUDIO_OPEN = {"modality": "audio", "presets": ["1.0", "tiny"], "source": "diffusers.StableAudioDiTModel"}
