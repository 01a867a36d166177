"""Tiny CLIP, SigLIP, BLIP and LLaVA models built in code, with a word-level tokenizer, for tests and dry runs.

They are randomly initialised (seeded) and need no download. ``tiny-clip``, ``tiny-siglip``,
``tiny-blip``, ``tiny-blip-vqa`` and ``tiny-llava`` resolve here through
:func:`rcc_compression.models.get_model`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from .base import image_processor_class
from .blip import BLIPWrapper
from .clip import CLIPWrapper
from .llava import LlavaWrapper
from .siglip import SigLIPWrapper

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[DEC]")
PAD, UNK, BOS, EOS, DEC = range(5)
IMAGE_TOKEN = "<image>"

_WORDS = (
    "a an the of photo picture image small big large tiny red green blue yellow purple orange white black "
    "gray pink brown circle square triangle star cross ring heart diamond one two three four left right "
    "above below and with on in is there what colour color shape next to top bottom some many object "
    "objects scene background noisy striped plain it this that are how"
).split()


def build_word_tokenizer(words: Iterable[str] = _WORDS, max_length: int = 16, template: str = "clip") -> Any:
    """A fast word-level tokenizer (``transformers.PreTrainedTokenizerFast``) over ``words``.

    ``template="clip"`` wraps texts as ``[BOS] ... [EOS]``; ``"blip"`` the same, with ``[DEC]``
    available as BLIP's decoder start token; ``"llava"`` starts texts with ``[BOS]`` only (a causal
    model continues them) and knows ``<image>`` as a special token.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    single = "[BOS] $A" if template == "llava" else "[BOS] $A [EOS]"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("[BOS]", BOS), ("[EOS]", EOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]",
        model_max_length=max_length,
    )
    if template == "blip":
        fast.add_special_tokens({"additional_special_tokens": ["[DEC]"]})
        fast.sep_token = "[EOS]"
        fast.cls_token = "[BOS]"
    if template == "llava":
        fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def tiny_clip_config(vocab_size: int, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8) -> Any:
    """A ``CLIPConfig`` with small sizes (defaults: width 32, 2 layers, 32x32 images)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=2,
        ),
        projection_dim=hidden // 2,
    )


def tiny_blip_config(vocab_size: int, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8) -> Any:
    """A ``BlipConfig`` with small sizes whose special token ids fit the word tokenizer."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=hidden,
            pad_token_id=PAD, bos_token_id=DEC, sep_token_id=EOS, eos_token_id=EOS,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=2,
            initializer_range=0.02,  # BLIP's vision default (1e-10) leaves an untrained tower at ~0
        ),
        projection_dim=hidden,
    )


def tiny_siglip_config(vocab_size: int, hidden: int = 32, layers: int = 2, image_size: int = 32, patch: int = 8
                       ) -> Any:
    """A ``SiglipConfig`` with small sizes (texts padded to 16 tokens, as SigLIP pads to its full length)."""
    from transformers import SiglipConfig

    return SiglipConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=BOS,
            eos_token_id=EOS, projection_size=hidden,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=2,
        ),
    )


def tiny_llava_config(vocab_size: int, image_token_id: int, hidden: int = 32, layers: int = 2, image_size: int = 32,
                      patch: int = 8) -> Any:
    """A ``LlavaConfig``: a small CLIP vision tower, a two-layer projector and a small Llama.

    The vision features are the penultimate tower layer's patch tokens (LLaVA-1.5's choice), so
    the tower's last block is computed and never read, as in the published models.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=image_size, patch_size=patch, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers + 1, num_attention_heads=2, projection_dim=hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
            bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        ),
        image_token_id=image_token_id, image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", pad_token_id=PAD,
        tie_word_embeddings=False, rcc_prompt_template=TINY_LLAVA_TEMPLATE, rcc_caption_prompt="",
    )


#: the tiny and world LLaVA models' prompt: the image, the question (or nothing, for a caption), a colon
TINY_LLAVA_TEMPLATE = IMAGE_TOKEN + " {} :"


def vit_b32_config() -> Any:
    """A ``CLIPConfig`` with OpenAI ViT-B/32's shapes (224 px, patch 32, 12 + 12 layers, widths 768 / 512)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )


def build_tiny(kind: str, seed: int = 0) -> Any:
    """Build ``tiny-clip``, ``tiny-siglip``, ``tiny-blip``, ``tiny-blip-vqa``, ``tiny-llava`` or
    ``random-clip-vit-b32`` as a wrapper, seeded."""
    from transformers import (
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        CLIPModel,
        LlavaForConditionalGeneration,
        SiglipModel,
    )

    torch.manual_seed(seed)
    if kind == "random-clip-vit-b32":  # full-size shapes, random weights: for speed and memory benchmarks
        return CLIPWrapper(CLIPModel(vit_b32_config()).eval(), name=kind)
    if kind == "tiny-clip":
        tok = build_word_tokenizer(max_length=16)
        model = CLIPModel(tiny_clip_config(len(tok)))
        proc = image_processor_class("clip")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return CLIPWrapper(model.eval(), proc, tok, name=kind)
    if kind == "tiny-siglip":
        tok = build_word_tokenizer(max_length=16)
        proc = image_processor_class("siglip")(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
        model = SiglipModel(tiny_siglip_config(len(tok)))
        with torch.no_grad():  # the paper's initial temperature and bias (t' = log 10, b = -10)
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
        return SigLIPWrapper(model.eval(), proc, tok, name=kind)
    if kind == "tiny-llava":
        tok = build_word_tokenizer(words=(*_WORDS, ":", "?"), max_length=64, template="llava")
        cfg = tiny_llava_config(len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN))
        proc = image_processor_class("clip")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return LlavaWrapper(LlavaForConditionalGeneration(cfg).eval(), proc, tok, name=kind)
    tok = build_word_tokenizer(max_length=32, template="blip")
    cfg = tiny_blip_config(len(tok))
    cls = BlipForQuestionAnswering if kind == "tiny-blip-vqa" else BlipForConditionalGeneration
    proc = image_processor_class("blip")(size={"height": 32, "width": 32})
    return BLIPWrapper(cls(cfg).eval(), proc, tok, name=kind)


TINY_MODELS = ("tiny-clip", "tiny-siglip", "tiny-blip", "tiny-blip-vqa", "tiny-llava")
RANDOM_MODELS = ("random-clip-vit-b32",)
