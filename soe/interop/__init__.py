"""Interop: trained stitches in the formats other tools load, and other tools' checkpoints in soe's.
``export`` is ``soe export`` (diffusers and ComfyUI LoRA files, merged experts + ``stitch.safetensors``) and
``soe.load_stitched``; ``convert`` maps the released UniVerse-1 checkpoint onto soe's stitched model.
May import :mod:`soe.train` (the ``trained/`` folder), :mod:`soe.recipe`, :mod:`soe.lora` and everything below.
"""
