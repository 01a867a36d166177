"""The bundled reference generative VLM, ``rcc-llava-world``: a LLaVA-style model trained on the world.

Parts: the bundled CLIP's vision tower (``rcc-clip-world``; the penultimate layer's patch tokens
are the image features, as in LLaVA-1.5), a two-layer GELU projector, and a small Llama decoder
over the world tokenizer. As in LLaVA, the vision tower stays frozen: its features are computed
once per training image, and the projector and the language model learn. One training step is a
batch of train-split images, each either captioned (the prompt is the image alone, the target one
of its five captions) or asked a question about it (the prompt is the question, the target its
answer), in the proportion ``vqa_fraction``; questions name only colour-shape pairs seen in
training. The loss is the language-modelling loss of the targets, with the reference job's
AdamW, warm-up and cosine decay fitted to the time budget.

:mod:`.reference` dispatches here for ``kind="llava"``; nothing here imports it.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.transforms import CLIP_MEAN, CLIP_STD, normalize
from ..data.world import IMAGE_TOKEN, SEEN_PAIRS, Scene, WorldObject, questions_for
from ..errors import DataError
from ..models.base import image_processor_class
from ..models.llava import LlavaWrapper
from ..models.registry import get_model

#: the world LLaVA's prompt: the image, then the question (nothing, for a caption), then a colon
WORLD_TEMPLATE = IMAGE_TOKEN + " {} :"
NAME = "rcc-llava-world"


def build_llava(recipe: Any, tokenizer: Any, image_size: int) -> LlavaWrapper:
    """A ``LlavaWrapper`` of the recipe's sizes; its vision tower starts from ``recipe.vision_from`` when set."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vocab = tokenizer.get_vocab()
    tower = None
    if recipe.vision_from:
        clip = get_model(recipe.vision_from)
        if clip.model_type != "clip":
            raise DataError(f"vision_from must name a CLIP model, got {recipe.vision_from} ({clip.model_type})")
        tower = clip.model.vision_model
        vcfg = clip.model.config.vision_config
        proc = clip.image_processor
    else:
        vcfg = CLIPVisionConfig(image_size=image_size, patch_size=recipe.patch, hidden_size=recipe.hidden,
                                intermediate_size=recipe.mlp_ratio * recipe.hidden,
                                num_hidden_layers=recipe.vision_layers, num_attention_heads=recipe.heads)
        proc = image_processor_class("clip")(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    h = recipe.lm_hidden
    tcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=h, intermediate_size=recipe.lm_mlp_ratio * h,
                       num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.heads,
                       num_key_value_heads=recipe.heads, max_position_embeddings=128,
                       pad_token_id=vocab["[PAD]"], bos_token_id=vocab["[BOS]"], eos_token_id=vocab["[EOS]"],
                       tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_id=vocab[IMAGE_TOKEN],
                      image_seq_length=(int(vcfg.image_size) // int(vcfg.patch_size)) ** 2,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", pad_token_id=vocab["[PAD]"], tie_word_embeddings=False,
                      rcc_prompt_template=WORLD_TEMPLATE, rcc_caption_prompt="")
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(cfg)
    if tower is not None:
        missing, unexpected = model.model.vision_tower.load_state_dict(tower.state_dict(), strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise DataError(f"the vision tower of {recipe.vision_from} does not fit: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    return LlavaWrapper(model, proc, tokenizer, name=NAME)


def scene_of(description: dict[str, Any]) -> Scene:
    """A :class:`Scene` with the objects of a record's scene description (what questions need)."""
    objs = tuple(WorldObject(o["shape"], o["colour"], o["size"], float(o["x"]), float(o["y"]), 0.0)
                 for o in description.get("objects", []))
    return Scene(objs, str(description.get("background", "plain")), ((0, 0, 0), (0, 0, 0)), (), 0.0, 0)


@torch.no_grad()
def image_features(wrapper: LlavaWrapper, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen vision tower's features of uint8 images (N x 3 x H x W), as the model selects them (float16).

    Exactly what ``LlavaModel.get_image_features`` feeds its projector: the configured layer's
    hidden states, the CLS token dropped under the ``default`` strategy.
    """
    cfg = wrapper.model.config
    tower = wrapper.model.model.vision_tower
    proc = wrapper.image_processor
    mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    parts = []
    for s in range(0, len(pixels), batch_size):
        hidden = tower(normalize(pixels[s:s + batch_size], mean, std), output_hidden_states=True).hidden_states
        feats = hidden[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]
        parts.append(feats.half())
    return torch.cat(parts)


def embed_with_features(model: Any, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Input embeddings with the projected image features written at the image positions (as LLaVA's forward does)."""
    emb = model.get_input_embeddings()(input_ids)
    proj = model.model.multi_modal_projector(features.to(emb.dtype))
    mask = input_ids == model.config.image_token_id
    return emb.masked_scatter(mask.unsqueeze(-1), proj.reshape(-1, proj.shape[-1]))


class LlavaBatches(Sequence[dict[str, Any]]):
    """The world LLaVA's training batches, drawn lazily in order (item ``i`` is the ``i``-th step's batch).

    A batch holds the images' precomputed tower ``features`` (the tower is frozen), token ids and
    labels. Every draw (images, caption or question) comes from generators seeded by the recipe in
    a fixed order, so a run is a function of its seed.
    """

    def __init__(self, recipe: Any, data: Any, wrapper: LlavaWrapper, features: torch.Tensor) -> None:
        self.recipe, self.data, self.wrapper, self.features = recipe, data, wrapper, features
        self.rng = random.Random(recipe.seed)
        self.np_rng = np.random.default_rng(recipe.seed)
        self.scenes = [scene_of(s) for s in data.scenes]

    def __len__(self) -> int:
        return self.recipe.steps

    def pair(self, i: int) -> tuple[str, str]:
        """(prompt, target) for image ``i``: a question and its answer, or the caption prompt and a caption.

        A third of the questions are yes/no ones (one in five or fewer of a scene's candidates):
        telling whether a colour-shape pair is present binds colour to shape, which captions and
        the other questions teach less often.
        """
        if self.rng.random() < self.recipe.vqa_fraction and self.scenes[i].objects:
            cands = questions_for(self.scenes[i], self.np_rng, SEEN_PAIRS)
            yes_no = [c for c in cands if c[2] == "yes/no"]
            pool = yes_no if yes_no and self.rng.random() < 1 / 3 else cands
            q, answers, _ = pool[self.rng.randrange(len(pool))]
            return q, Counter(answers).most_common(1)[0][0]
        return self.wrapper.caption_prompt, self.rng.choice(self.data.captions[i])

    def __getitem__(self, step: Any) -> dict[str, Any]:
        idx = torch.tensor([self.rng.randrange(len(self.scenes)) for _ in range(self.recipe.batch_size)])
        prompts, targets = zip(*(self.pair(i) for i in idx.tolist()), strict=True)
        return {"features": self.features[idx], **self.wrapper.training_inputs(list(prompts), list(targets))}


def llava_loss(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The language-modelling loss of a :class:`LlavaBatches` batch (features in place of pixels)."""
    emb = embed_with_features(model, batch["input_ids"], batch["features"])
    return model(inputs_embeds=emb, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def freeze_tower(wrapper: LlavaWrapper) -> None:
    """Freeze the vision tower (LLaVA trains the projector and the language model only)."""
    for p in wrapper.model.model.vision_tower.parameters():
        p.requires_grad_(False)
