"""BLIP wrapper over ``BlipForConditionalGeneration`` and ``BlipForQuestionAnswering``."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelWrapper

_VISION = r"^vision_model\.encoder\.layers\.\d+\.(self_attn\.(qkv|projection)|mlp\.fc[12])$"
_BERT = (r"\.encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)"
         r"|crossattention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)$")


class BLIPWrapper(ModelWrapper):
    """Image encoder, caption generation (greedy and beam) and the captioning loss of one BLIP model.

    With a ``BlipForQuestionAnswering`` model, :meth:`answer` answers questions about images.
    """

    model_type = "blip"
    default_targets = (_VISION, r"^text_(decoder\.bert|encoder)" + _BERT)
    default_ignore = (r"embeddings", r"cls\.predictions", r"lm_head")

    @property
    def is_vqa(self) -> bool:
        return type(self.model).__name__ == "BlipForQuestionAnswering"

    @property
    def tasks(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"vqa"} if self.is_vqa else {"captioning"})

    @property
    def max_text_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 40) or 40)

    def encode_image(self, images: Any, pooled: bool = True) -> torch.Tensor:
        """Image features: the pooled (post-layernorm [CLS]) vector, or every patch if ``pooled=False``."""
        pixels = self.prepare_images(images)
        out = self.model.vision_model(pixel_values=pixels)
        return out.pooler_output if pooled else out.last_hidden_state

    def encode_text(self, text: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids for strings (BLIP has no standalone text embedding space)."""
        if isinstance(text, torch.Tensor):
            return text.to(self.device)
        return self.tokenize(text)["input_ids"]

    @torch.no_grad()
    def generate_caption(
        self, images: Any, num_beams: int = 1, max_length: int = 20, prompt: str | None = None, **kwargs: Any
    ) -> list[str]:
        """Captions as strings; ``num_beams > 1`` is beam search, 1 is greedy decoding."""
        if self.is_vqa:
            raise TypeError("generate_caption needs a captioning BLIP; this one answers questions (use answer())")
        pixels = self.prepare_images(images)
        extra: dict[str, Any] = {}
        if prompt:
            enc = self.tokenize([prompt] * pixels.shape[0])
            extra["input_ids"] = enc["input_ids"][:, :-1]
            extra["attention_mask"] = enc["attention_mask"][:, :-1]
        out = self.model.generate(
            pixel_values=pixels, num_beams=num_beams, max_length=max_length, do_sample=False, **extra, **kwargs
        )
        return [s.strip() for s in self.decode(out)]

    @torch.no_grad()
    def answer(self, images: Any, questions: str | list[str], max_length: int = 10, num_beams: int = 1) -> list[str]:
        """Answers to questions about images (VQA model only)."""
        if not self.is_vqa:
            raise TypeError("answer() needs a BlipForQuestionAnswering model")
        pixels = self.prepare_images(images)
        qs = [questions] * pixels.shape[0] if isinstance(questions, str) else list(questions)
        enc = self.tokenize(qs)
        out = self.model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pixels,
            max_length=max_length, num_beams=num_beams, do_sample=False,
        )
        return [s.strip() for s in self.decode(out)]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids to strings without special tokens."""
        if self.tokenizer is None:
            return [" ".join(map(str, row.tolist())) for row in ids]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def compute_loss(
        self,
        pixel_values: Any,
        input_ids: Any,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Language-modelling loss of the captions (or answers, for VQA) given the images."""
        pixels = self.prepare_images(pixel_values)
        if not isinstance(input_ids, torch.Tensor):
            enc = self.tokenize(input_ids)
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if self.is_vqa:
            if labels is None:
                raise ValueError("VQA loss needs answer token ids as labels")
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels.to(self.device)
            ).loss
        # generate() starts decoding from the decoder's BOS ([DEC]); the loss must see the same first token
        bos = self.model.config.text_config.bos_token_id
        if bos is not None:
            input_ids = input_ids.clone()
            input_ids[:, 0] = bos
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, -100) if attention_mask is not None else input_ids
        return self.model(pixel_values=pixels, input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    def synthetic_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        tcfg = self.model.config.text_config
        size = self.model.config.vision_config.image_size
        length = min(12, tcfg.max_position_embeddings)
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        ids = torch.randint(0, tcfg.vocab_size, (batch_size, length), generator=generator)
        if tcfg.bos_token_id is not None and 0 <= tcfg.bos_token_id < tcfg.vocab_size:
            ids[:, 0] = tcfg.bos_token_id
        batch = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.is_vqa:
            batch["labels"] = ids.clone()
        return batch
