"""Tiny random vision-language models, built offline, for tests of the VLM backend.

``build_tiny_vlm(kind, path)`` writes a complete Hugging Face folder (model, processor,
tokenizer, chat template) for a LLaVA-1.5 style model (``"llava"``: CLIP vision tower,
Llama text model) or a Qwen2-VL model (``"qwen2_vl"``). Nothing is downloaded: the configs
are tiny, the weights are random (``torch.manual_seed(0)``) and the tokenizer is a
byte-level BPE without merges, so any text encodes losslessly over a vocabulary of 256 byte
tokens plus the special tokens each processor needs. Each folder is well under 1 MB and
processes images at 32-64 px, so one ``generate`` call takes a few hundredths of a second
on one thread (more threads only add contention at this size).

The folders load through the generic path::

    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(images=images, text=prompts, padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
"""

from __future__ import annotations

import pathlib

import pytest
import torch

KINDS = ("llava", "qwen2_vl")

LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\n' }}"
    "{% else %}"
    "{{ message['role'].upper() }}{{ ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_level_tokenizer(special_tokens: list[str], **named_tokens):
    """A ``PreTrainedTokenizerFast`` over the 256 byte symbols, followed by ``special_tokens``.

    ``named_tokens`` (``bos_token="<s>"`` and so on) must be among ``special_tokens``.
    Padding is on the left, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for token in special_tokens:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special_tokens)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **named_tokens)
    assert len(tok) == len(vocab)
    return tok


def _build_llava(path: pathlib.Path) -> None:
    """LLaVA-1.5 layout: CLIP tower (32 px, 8 px patches, CLS), 2-layer MLP projector, Llama."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _byte_level_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<s>", "</s>", "<pad>", "<image>")}
    image_size, patch_size = 32, 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=ids["<s>"],
                       eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids["<image>"],
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    _set_generation_ids(model, ids["<s>"], ids["</s>"], ids["<pad>"])

    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>",
                               chat_template=LLAVA_CHAT_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _build_qwen2_vl(path: pathlib.Path) -> None:
    """Qwen2-VL layout: 8 px patches, 2x2 merge, images resized to 32-64 px, M-RoPE text model."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = _byte_level_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    patch_size, merge_size, temporal_patch_size = 8, 2, 2
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2,
                  patch_size=patch_size, spatial_merge_size=merge_size,
                  temporal_patch_size=temporal_patch_size)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 2, 2]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2VLConfig(vision_config=vision, text_config=text,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    _set_generation_ids(model, ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"])

    pixels = dict(min_pixels=32 * 32, max_pixels=64 * 64, patch_size=patch_size,
                  merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(**pixels),
                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _set_generation_ids(model, bos: int, eos: int, pad: int) -> None:
    """Point the model's generation config at the tiny vocabulary's bos, eos and pad ids."""
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad


def build_tiny_vlm(kind: str, path: pathlib.Path) -> pathlib.Path:
    """Write a tiny random VLM of architecture ``kind`` ("llava" or "qwen2_vl") to ``path``.

    The folder holds the model (random weights, seed 0) and its processor (image processor,
    byte-level tokenizer with left padding, chat template), loadable offline with
    ``AutoProcessor`` and ``AutoModelForImageTextToText``. Returns ``path``.
    """
    builders = {"llava": _build_llava, "qwen2_vl": _build_qwen2_vl}
    if kind not in builders:
        raise ValueError(f"unknown tiny VLM kind {kind!r}; expected one of {sorted(builders)}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    builders[kind](path)
    return path


@pytest.fixture
def one_thread():
    """Run torch on one thread: models this small only lose time to thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_vlms_generate(tmp_path, kind, one_thread):
    """The generic load/prompt/generate/decode path yields 12 new tokens, alone and in a batch."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = build_tiny_vlm(kind, tmp_path / kind)
    proc = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    images = [Image.new("RGB", (64, 48), (200, 120, 40)), Image.new("RGB", (40, 56), (10, 90, 220))]
    questions = ["Why is this a cat?", "What is in the picture, and why does it matter?"]
    prompts = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            add_generation_prompt=True)
        for q in questions
    ]
    assert all(isinstance(p, str) for p in prompts)

    inputs = proc(images=images[:1], text=prompts[:1], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    assert new.shape == (1, 12)
    assert isinstance(proc.batch_decode(new, skip_special_tokens=True)[0], str)

    batch = proc(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, -1] == 1).all()
    out = model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert out[:, batch["input_ids"].shape[1]:].shape == (2, 12)
    assert len(proc.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)) == 2

    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=True,
                         num_return_sequences=2)
    assert out[:, inputs["input_ids"].shape[1]:].shape == (2, 12)
