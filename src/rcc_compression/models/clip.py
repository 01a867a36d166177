"""CLIP wrapper over ``transformers.CLIPModel`` (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import ModelWrapper

_CLIP_LINEAR = r"\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"


class CLIPWrapper(ModelWrapper):
    """Image and text encoders, logit-scaled similarity, and the processors, for one CLIP model."""

    model_type = "clip"
    tasks = frozenset({"zero_shot", "retrieval", "embed"})
    default_targets = (r"^(vision_model|text_model)" + _CLIP_LINEAR,)
    default_ignore = (r"(^|\.)(visual_projection|text_projection)$", r"embeddings", r"logit_scale")

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:
        """Projected image embeddings (L2-normalised by default) for pixel tensors or PIL images."""
        pixels = self.prepare_images(images)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        emb = self.model.visual_projection(pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(
        self, text: Any, attention_mask: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """Projected text embeddings for token-id tensors or strings."""
        ids, mask = self.prepare_text(text, attention_mask)
        pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
        emb = self.model.text_projection(pooled)
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def compute_similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logit-scaled cosine similarity, images x texts (the model's ``logits_per_image``)."""
        img = F.normalize(image_embeds, dim=-1)
        txt = F.normalize(text_embeds, dim=-1)
        return self.logit_scale * img @ txt.t()

    def synthetic_batch(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        cfg = self.model.config
        size = cfg.vision_config.image_size
        length = min(16, cfg.text_config.max_position_embeddings)
        vocab = cfg.text_config.vocab_size
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
        ids = torch.randint(0, vocab, (batch_size, length), generator=generator)
        eos = cfg.text_config.eos_token_id
        if eos is not None and 0 <= eos < vocab:
            ids[:, -1] = eos
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
