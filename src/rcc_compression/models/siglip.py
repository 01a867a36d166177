"""SigLIP wrapper over ``transformers.SiglipModel``: a contrastive image-text model with sigmoid scores.

SigLIP scores an image-text pair on its own, ``sigmoid(scale * cos + bias)``, instead of a softmax
over a batch (Zhai et al., ICCV 2023). Its embeddings have no projection layer: the vision
tower ends in an attention-pooling head (``vision_model.head``) and the text tower in a linear
head applied to the last token, which is why texts are padded to the full length the model was
trained with. Ranking by the sigmoid score is ranking by cosine similarity, so zero-shot
classification and retrieval run through the same evaluation suite as CLIP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from .base import ModelWrapper

_SIGLIP_LINEAR = r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"


class SigLIPWrapper(ModelWrapper):
    """Image and text encoders, sigmoid pair scores and the processors, for one SigLIP model."""

    model_type = "siglip"
    tasks = frozenset({"zero_shot", "retrieval", "embed"})
    default_targets = (r"^(vision_model|text_model)" + _SIGLIP_LINEAR,)
    # the pooling head's attention is torch's MultiheadAttention, which reads ``out_proj.weight``
    # directly: it must stay an nn.Linear; the text head is the projection into the joint space
    default_ignore = (r"(^|\.)head(\.|$)", r"embeddings", r"logit_(scale|bias)")
    #: calibration is image-text pairs; noise or text alone is refused unless asked for
    paired_calibration = True

    def tokenize(self, texts: str | Iterable[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Token ids padded to the full text length: SigLIP pools the last position, as it was trained."""
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer; pass input_ids tensors")
        texts = [texts] if isinstance(texts, str) else list(texts)
        limit = max_length or self.max_text_length
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=limit, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    @property
    def max_text_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 64) or 64)

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:
        """Pooled image embeddings (L2-normalised by default) for pixel tensors or PIL images."""
        pixels = self.prepare_images(images)
        emb = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(
        self, text: Any, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Pooled text embeddings for token-id tensors or strings."""
        ids, mask = self.prepare_text(text, attention_mask)
        emb = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    @property
    def logit_bias(self) -> torch.Tensor:
        return self.model.logit_bias

    def compute_similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Pair logits, images x texts: ``scale * cos + bias`` (the model's ``logits_per_image``)."""
        img = F.normalize(image_embeds, dim=-1)
        txt = F.normalize(text_embeds, dim=-1)
        return self.logit_scale * img @ txt.t() + self.logit_bias

    def pair_probabilities(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Sigmoid score of every image-text pair: the probability that the text describes the image."""
        return torch.sigmoid(self.compute_similarity(image_embeds, text_embeds))

    def synthetic_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        size = cfg.vision_config.image_size
        length = min(16, cfg.text_config.max_position_embeddings)
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        ids = torch.randint(0, cfg.text_config.vocab_size, (batch_size, length), generator=generator)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
