"""Tiny random-weight Whisper and Qwen2.5-Omni folders, saved the way the released checkpoints are
(``save_pretrained`` of the model and of its tokenizer / processor), for the annotate tests. No network."""
from __future__ import annotations

from pathlib import Path

import torch

# The chat template of the released Qwen2.5-Omni (its media and text parts; the tests give no system turn)
OMNI_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
OMNI_SPECIAL = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                "vision_eos_token": "<|vision_eos|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}


def _byte_vocab() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: i for i, c in enumerate(bytes_to_unicode().values())}


def _letters(vocab: dict[str, int]) -> set[int]:
    """Token ids of a-z and the byte-level space (so a random model writes words)."""
    return {vocab[c] for c in "abcdefghijklmnopqrstuvwxyz"} | {vocab["Ġ"]}


def omni_folder(root: Path, full: bool = True, seed: int = 0) -> Path:
    """Qwen2.5-Omni: the released layout (``Qwen2_5OmniForConditionalGeneration``, thinker weights under
    ``thinker.``, no talker) when ``full``, else the thinker alone; with its processor."""
    from transformers import (Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor,
                              Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2Tokenizer,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor)

    vocab = _byte_vocab()
    for token in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *OMNI_SPECIAL.values()]:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=OMNI_SPECIAL)
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}  # few vision tokens: fast
    processor = Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
                                     feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                                     chat_template=OMNI_TEMPLATE)
    ids = {k: vocab[t] for k, t in (("audio_token_index", "<|AUDIO|>"), ("image_token_index", "<|IMAGE|>"), ("video_token_index", "<|VIDEO|>"),
                                    ("audio_start_token_id", "<|audio_bos|>"), ("audio_end_token_id", "<|audio_eos|>"),
                                    ("vision_start_token_id", "<|vision_bos|>"), ("vision_end_token_id", "<|vision_eos|>"))}
    thinker = dict(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         eos_token_id=vocab["<|im_end|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, fullatt_block_indexes=[0]),
        audio_config=dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=32),
        user_token_id=vocab["<|im_start|>"], **ids)
    torch.manual_seed(seed)
    if full:
        model = Qwen2_5OmniForConditionalGeneration(Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False))
    else:
        model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**thinker))
    allowed = _letters(vocab) | {vocab["<|im_end|>"]}  # a random model that writes letters and spaces
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in allowed]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.save_pretrained(root)
    processor.save_pretrained(root)
    if full:  # the released folder's voices (Qwen2_5OmniForConditionalGeneration.from_pretrained reads them)
        torch.save({"Chelsie": {"bos_token": 0}}, root / "spk_dict.pt")
    return root


def whisper_folder(root: Path, seed: int = 0) -> Path:
    """Whisper with word timestamps (alignment heads, timestamp tokens, languages and tasks in its generation config)."""
    from tokenizers import AddedToken
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor, WhisperTokenizer

    vocab = _byte_vocab()
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>", *(f"<|{i * 0.02:.2f}|>" for i in range(1501))]
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_tokens([AddedToken(s, special=True, normalized=False) for s in specials], special_tokens=True)
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in specials[:9]}
    eos, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_target_positions=32,
                           pad_token_id=eos, bos_token_id=eos, eos_token_id=eos, decoder_start_token_id=sot,
                           begin_suppress_tokens=None, suppress_tokens=None)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    allowed = _letters(vocab) | set(ids.values()) | set(range(ids["<|notimestamps|>"] + 1, len(tokenizer)))  # letters, timestamps
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"], lang_to_id={"<|en|>": ids["<|en|>"]}, is_multilingual=True, max_length=32,
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}, alignment_heads=[[0, 0], [0, 1]],
        begin_suppress_tokens=[eos], suppress_tokens=[i for i in range(len(tokenizer)) if i not in allowed], max_initial_timestamp_index=50)
    model.save_pretrained(root)
    WhisperProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=80), tokenizer=tokenizer).save_pretrained(root)
    return root


VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def image_text_folder(root: Path, seed: int = 0) -> Path:
    """An image-text-to-text model (Qwen2-VL, video captions only) with its processor, the layout of a released one."""
    from transformers import (Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    vocab = _byte_vocab()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    for token in special:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>",
                               extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    pixels = {"min_pixels": 28 * 28, "max_pixels": 56 * 56}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), video_processor=Qwen2VLVideoProcessor(**pixels),
                                 tokenizer=tokenizer, chat_template=VL_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    allowed = _letters(vocab) | {vocab["<|im_end|>"]}
    model.generation_config.suppress_tokens = [i for i in range(len(vocab)) if i not in allowed]
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root
