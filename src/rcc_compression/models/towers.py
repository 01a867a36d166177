"""Which tower every module of a vision-language model belongs to, and what role it plays there.

Towers: ``vision`` (the image encoder), ``text`` (a text encoder), ``projector`` (what maps one
tower's features into another's space: CLIP's and SigLIP's text/visual projections, LLaVA's
multi-modal projector), ``language_model`` (a decoder that writes text, with its output head) and
``other`` (what belongs to no tower: CLIP's logit scale, or any module of an unknown model).

Roles: ``patch_embedding``, ``embedding`` (token and position tables), ``block`` (a transformer
layer, with its index in its stack and whether it is the first or last one), ``head``
(pooling heads, the LM head), ``projector``, ``norm`` and ``other``. Budgets use them: the patch
embedding, the projector and the first and last block of each stack are the layers published
work keeps at higher precision.

Classification is by module name, per model family, so it works on a module tree alone (a
compressed model, a skeleton rebuilt from a checkpoint) without running anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

TOWERS = ("vision", "text", "projector", "language_model", "other")

#: per model type: (regex on the module name, tower), first match wins
TOWER_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "clip": ((r"^vision_model(\.|$)", "vision"), (r"^text_model(\.|$)", "text"),
             (r"^(visual|text)_projection(\.|$)", "projector")),
    "siglip": ((r"^vision_model(\.|$)", "vision"), (r"^text_model\.head(\.|$)", "projector"),
               (r"^text_model(\.|$)", "text")),
    "blip": ((r"^vision_model(\.|$)", "vision"), (r"^text_encoder(\.|$)", "text"),
             (r"^text_decoder(\.|$)", "language_model"), (r"^(vision_proj|text_proj|itm_head)(\.|$)", "projector")),
    "llava": ((r"^(model\.)?vision_tower(\.|$)", "vision"), (r"^(model\.)?multi_modal_projector(\.|$)", "projector"),
              (r"^(model\.)?language_model(\.|$)", "language_model"), (r"^lm_head(\.|$)", "language_model")),
}

_STACK = re.compile(r"^(?P<stack>.*?\.(?:layers|layer|blocks|h))\.(?P<index>\d+)(\.|$)")
_ROLE_RULES = (
    (re.compile(r"patch_embedding$|patch_embed(\.proj)?$"), "patch_embedding"),
    (re.compile(r"(^|\.)(embeddings?|embed_tokens|embed_positions|position_embedding|token_embedding|"
                r"word_embeddings|position_embeddings)(\.|$)"), "embedding"),
    (re.compile(r"(^|\.)(lm_head|head|predictions|cls)(\.|$)"), "head"),
    (re.compile(r"(layer_?norm|layernorm|norm\d*|ln_\w+|rms_?norm)$"), "norm"),
)


def family(model: nn.Module) -> str:
    """The model type whose rules classify ``model`` (``clip``, ``siglip``, ``blip``, ``llava``), or ``generic``."""
    inner = getattr(model, "model", model) if hasattr(model, "model_type") else model
    mtype = str(getattr(getattr(inner, "config", None), "model_type", "") or "")
    return mtype if mtype in TOWER_RULES else "generic"


def tower_of(model_type: str, name: str) -> str:
    """The tower a module (or parameter) name belongs to under ``model_type``'s rules."""
    for pattern, tower in TOWER_RULES.get(model_type, ()):
        if re.search(pattern, name):
            return tower
    return "other"


@dataclass(frozen=True)
class Placement:
    """Where one module sits: its tower, its role, and for a block its stack, index and position."""

    tower: str
    role: str
    stack: str | None = None
    index: int | None = None
    first: bool = False
    last: bool = False

    @property
    def position(self) -> str:
        """``first_block``, ``last_block``, ``block`` or the role itself."""
        if self.role == "block" and self.first:
            return "first_block"
        if self.role == "block" and self.last:
            return "last_block"
        return self.role


def stack_depths(names: Iterable[str]) -> dict[str, int]:
    """Number of blocks of every layer stack (``...encoder.layers`` -> 12) among module names."""
    depth: dict[str, int] = {}
    for n in names:
        m = _STACK.match(n)
        if m:
            depth[m["stack"]] = max(depth.get(m["stack"], 0), int(m["index"]) + 1)
    return depth


def place(model_type: str, name: str, depths: dict[str, int]) -> Placement:
    """The tower and role of module ``name``; ``depths`` from :func:`stack_depths` over the model's names."""
    tower = tower_of(model_type, name)
    m = _STACK.match(name)
    if tower == "projector":
        return Placement(tower, "projector")
    for pattern, role in _ROLE_RULES:
        if role in ("patch_embedding", "embedding") and pattern.search(name):
            return Placement(tower, role)
    if m:
        depth = depths.get(m["stack"], int(m["index"]) + 1)
        index = int(m["index"])
        return Placement(tower, "block", m["stack"], index, index == 0, index == depth - 1)
    for pattern, role in _ROLE_RULES:
        if pattern.search(name):
            return Placement(tower, role)
    return Placement(tower, "other")


def classify_modules(model: nn.Module) -> dict[str, Placement]:
    """Every named module of ``model`` (a wrapper's inner model or a plain one) with its placement."""
    inner = getattr(model, "model", model) if hasattr(model, "model_type") else model
    kind = family(inner)
    names = [n for n, _ in inner.named_modules() if n]
    depths = stack_depths(names)
    return {n: place(kind, n, depths) for n in names}
