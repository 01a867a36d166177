"""LLaVA-style wrapper over ``transformers.LlavaForConditionalGeneration``: image + prompt -> text.

A LLaVA model is a vision tower (a CLIP or SigLIP ViT), a projector that maps the tower's patch
features into the language model's embedding space, and a causal language model. The prompt
holds one image token; it stands for as many positions as the tower yields patch features, and
the model writes the projected features there. Captions and answers are generated with the key/value
cache (``generate``), greedily or with beams.

The prompt format is the model's: ``prompt_template`` (a string with ``<image>``, or whatever
the model's image token is, and ``{}`` for the text) is taken from the config key
``rcc_prompt_template`` when the model carries one (the bundled and tiny models do), else LLaVA-1.5's
``"USER: <image>\\n{} ASSISTANT:"``; ``caption_prompt`` likewise from ``rcc_caption_prompt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import ModelWrapper

LLAVA15_TEMPLATE = "USER: <image>\n{} ASSISTANT:"
LLAVA15_CAPTION_PROMPT = "Describe the image in one sentence."

_VISION = r"^(model\.)?vision_tower\.(vision_model\.)?encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
_PROJECTOR = r"^(model\.)?multi_modal_projector\.linear_\d+$"
_LM = (r"^(model\.)?language_model\.(model\.)?layers\.\d+\."
       r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$")


class LlavaWrapper(ModelWrapper):
    """Captioning and visual question answering with one LLaVA-style model, and its training loss."""

    model_type = "llava"
    tasks = frozenset({"captioning", "vqa"})
    default_targets = (_VISION, _PROJECTOR, _LM)
    default_ignore = (r"embed", r"(^|\.)lm_head$", r"(^|\.)head(\.|$)")
    paired_calibration = True

    def __init__(self, model: Any, image_processor: Any = None, tokenizer: Any = None, name: str = "",
                 prompt_template: str | None = None, caption_prompt: str | None = None) -> None:
        super().__init__(model, image_processor, tokenizer, name)
        cfg = model.config
        self.prompt_template = prompt_template or getattr(cfg, "rcc_prompt_template", None) or LLAVA15_TEMPLATE
        self.caption_prompt = (caption_prompt if caption_prompt is not None
                               else getattr(cfg, "rcc_caption_prompt", LLAVA15_CAPTION_PROMPT))

    # ------------------------------------------------------------------ shapes
    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @property
    def image_token(self) -> str:
        if self.tokenizer is None:
            return "<image>"
        return str(self.tokenizer.convert_ids_to_tokens(self.image_token_id))

    @property
    def num_image_tokens(self) -> int:
        """Positions one image takes in the sequence: the tower's patches, plus its CLS token under ``full``."""
        cfg = self.model.config
        vc = cfg.vision_config
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2
        has_cls = getattr(vc, "model_type", "") == "clip_vision_model"
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        return patches + (1 if has_cls and strategy == "full" else 0)

    @property
    def max_text_length(self) -> int:
        tcfg = self.model.config.text_config
        return int(getattr(tcfg, "max_position_embeddings", 512) or 512)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        if pad is None:
            pad = getattr(self.model.config.text_config, "pad_token_id", None)
        return int(pad if pad is not None else 0)

    @property
    def eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        if eos is None:
            eos = getattr(self.model.config.text_config, "eos_token_id", None)
        return None if eos is None else int(eos if not isinstance(eos, list) else eos[0])

    # ------------------------------------------------------------------ token sequences
    def _ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer; pass input_ids tensors")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _expand(self, ids: Sequence[int]) -> list[int]:
        """Token ids with the image token repeated once per image feature position."""
        img, n = self.image_token_id, self.num_image_tokens
        out: list[int] = []
        for t in ids:
            out += [img] * n if t == img else [int(t)]
        if out.count(img) != n:
            raise ValueError(f"the prompt must hold the image token {self.image_token!r} exactly once "
                             f"(prompt template {self.prompt_template!r})")
        return out

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of one prompt in the model's format, image positions expanded."""
        return self._expand(self._ids(self.prompt_template.format(prompt)))

    def _target_ids(self, target: str) -> list[int]:
        ids = list(self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
        return ids + ([self.eos_token_id] if self.eos_token_id is not None else [])

    def _pad(self, rows: Sequence[Sequence[int]], side: str, value: int) -> torch.Tensor:
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, r in enumerate(rows):
            if side == "left":
                out[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def prompt_inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` of prompts, ready for ``generate``."""
        rows = [self.prompt_ids(p) for p in prompts]
        ids = self._pad(rows, "left", self.pad_token_id)
        mask = self._pad([[1] * len(r) for r in rows], "left", 0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def training_inputs(self, prompts: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` of prompt + target (+ EOS); only the target is scored.

        Right-padded: this is what the language-modelling loss, calibration and distillation read.
        """
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts for {len(targets)} targets")
        seqs, labels = [], []
        for p, t in zip(prompts, targets, strict=True):
            head, tail = self.prompt_ids(p), self._target_ids(t)
            seqs.append(head + tail)
            labels.append([-100] * len(head) + tail)
        ids = self._pad(seqs, "right", self.pad_token_id)
        mask = self._pad([[1] * len(s) for s in seqs], "right", 0)
        lab = self._pad(labels, "right", -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def generate_text(self, images: Any, prompts: Sequence[str], max_length: int = 20, num_beams: int = 1,
                      **kwargs: Any) -> list[str]:
        """Text the model writes after each (image, prompt); ``max_length`` counts new tokens."""
        pixels = self.prepare_images(images)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {pixels.shape[0]} images")
        enc = self.prompt_inputs(prompts)
        out = self.model.generate(
            **enc, pixel_values=pixels, max_new_tokens=max_length, num_beams=num_beams, do_sample=False,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            suppress_tokens=[self.image_token_id], **kwargs,  # an image position is never text
        )
        return [s.strip() for s in self.decode(out[:, enc["input_ids"].shape[1]:])]

    def generate_caption(
        self, images: Any, num_beams: int = 1, max_length: int = 20, prompt: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Captions as strings; ``prompt`` replaces the model's caption instruction."""
        pixels = self.prepare_images(images)
        text = self.caption_prompt if prompt is None else prompt
        return self.generate_text(pixels, [text] * pixels.shape[0], max_length, num_beams, **kwargs)

    def answer(self, images: Any, questions: str | list[str], max_length: int = 10, num_beams: int = 1) -> list[str]:
        """Answers to questions about images (one question for all, or one per image)."""
        pixels = self.prepare_images(images)
        qs = [questions] * pixels.shape[0] if isinstance(questions, str) else list(questions)
        return self.generate_text(pixels, qs, max_length, num_beams)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids to strings without special tokens."""
        if self.tokenizer is None:
            return [" ".join(map(str, row.tolist())) for row in ids]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def compute_loss(self, pixel_values: Any, targets: Sequence[str], prompts: Sequence[str] | None = None
                     ) -> torch.Tensor:
        """Language-modelling loss of ``targets`` (captions, or answers to ``prompts``) given the images."""
        pixels = self.prepare_images(pixel_values)
        prompts = [self.caption_prompt] * len(targets) if prompts is None else list(prompts)
        batch = {k: v.to(self.device) for k, v in self.training_inputs(prompts, targets).items()}
        return self.model(pixel_values=pixels, **batch).loss

    def synthetic_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Random pixels and token ids around the image positions (timing and shapes only; never calibration)."""
        cfg = self.model.config
        size = cfg.vision_config.image_size
        vocab = cfg.text_config.vocab_size
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        text = torch.randint(0, vocab, (batch_size, 8), generator=generator)
        text[text == self.image_token_id] = self.pad_token_id if self.pad_token_id != self.image_token_id else 0
        image = torch.full((batch_size, self.num_image_tokens), self.image_token_id, dtype=torch.long)
        ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
