"""LoRA on experts: ``adapters`` puts peft LoRA layers on an expert by its declared targets (exact name,
suffix or regex; loud when nothing matches), sets each expert frozen, fully trained or LoRA-trained, counts
adapters without building them and starts from an existing LoRA file (``lora.init_from``); ``formats`` reads
and writes the LoRA files of other tools (diffusers, peft, ComfyUI key naming and alpha, Wan's original
module names). May import :mod:`soe.plugin`, :mod:`soe.schema` and :mod:`soe.errors`.
"""
