"""Which Linear layers a run compresses, why, and in what format: module matching a user can see.

Stages pick layers with ``targets``/``ignore`` regexes (``re.search`` on module names). A pattern
that matches nothing is the classic silent failure of compression tools (an ``ignore`` meant for a
vision tower whose modules are named differently quantizes the tower anyway), so a pattern the
user gives that matches no Linear layer is an error naming the pattern and the nearest module
names (:func:`check_patterns`). :func:`match_layers` says, for every Linear of a model, its tower
and role, whether it is selected and which pattern decided it; :func:`dry_run_report` adds the
format and bytes each stage (or the rate plan) gives it, which is what ``rcc compress --dry-run``
and ``compress_model(..., dry_run=True)`` print without compressing anything.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import CompressionError
from ..models.registry import default_patterns, unwrap_model
from ..models.towers import Placement, classify_modules
from .layers import CompressedLinear

#: why a Linear inside ``nn.MultiheadAttention`` is never selected: torch reads its weight directly
MHA_REASON = "inside nn.MultiheadAttention (torch reads out_proj.weight directly; it must stay a Linear)"


@dataclass
class LayerMatch:
    """One Linear layer: where it sits, whether the patterns select it, and the rule that decided."""

    name: str
    module: str
    tower: str
    role: str
    out_features: int
    in_features: int
    dense_bytes: int
    selected: bool
    rule: str
    format: str = ""
    planned_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (or compressed Linear) of a model, by name."""
    inner = unwrap_model(model)
    return {n: m for n, m in inner.named_modules() if n and isinstance(m, (nn.Linear, CompressedLinear))}


def _mha_owned(model: nn.Module) -> set[str]:
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _compile(patterns: Sequence[str], kind: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as exc:
            raise CompressionError(f"{kind} pattern {p!r} is not a valid regular expression: {exc}") from None
    return out


def nearest_names(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The module names closest to what ``pattern`` seems to mean (for error messages)."""
    names = list(names)
    literal = re.sub(r"\\(.)", r"\1", re.sub(r"[\^\$\*\+\?\(\)\[\]\{\}\|]|\\[dDsSwWb]|\.\*", " ", pattern))
    words = [w for w in re.split(r"[\s.]+", literal) if w]
    close = difflib.get_close_matches(literal.strip(" ."), names, n=n, cutoff=0.0)
    # names sharing the pattern's longest literal piece first: 'vision_tower' -> 'model.vision_tower.*'
    if words:
        key = max(words, key=len)
        sharing = [x for x in names if key in x]
        close = list(dict.fromkeys(sharing[:n] + close))[:n]
    return close


def check_patterns(model: nn.Module, targets: Sequence[str] | None, ignore: Sequence[str] | None,
                   where: str = "") -> None:
    """Raise :class:`CompressionError` for a given ``targets``/``ignore`` pattern that matches no Linear layer.

    ``None`` (the model's defaults) is not checked: defaults cover families whose members differ.
    The error names the pattern and the nearest Linear layer names.
    """
    names = list(linear_layers(model))
    if not names:  # nothing to select at all: the stages say so ("no Linear layer ...")
        return
    for kind, patterns in (("targets", targets), ("ignore", ignore)):
        if patterns is None:
            continue
        for pattern, compiled in zip(patterns, _compile(patterns, kind), strict=True):
            if not any(compiled.search(n) for n in names):
                near = nearest_names(pattern, names)
                raise CompressionError(
                    f"{where + ': ' if where else ''}{kind} pattern '{pattern}' matches no Linear layer of "
                    f"{type(unwrap_model(model)).__name__} ({len(names)} Linear layers); nearest names: "
                    f"{', '.join(near) if near else 'none'} (patterns are regexes searched in module names)")


def match_layers(model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
                 check: bool = True) -> list[LayerMatch]:
    """Every Linear of ``model`` with its tower and role, selected or not, and the pattern that decided.

    ``targets``/``ignore`` ``None`` are the model family's defaults. With ``check``, a given
    pattern that matches no Linear layer raises (:func:`check_patterns`).
    """
    inner = unwrap_model(model)
    if check:
        check_patterns(inner, targets, ignore)
    dt, di = default_patterns(inner)
    t_src = "targets" if targets is not None else "default targets"
    i_src = "ignore" if ignore is not None else "default ignore"
    tpat = list(zip(dt if targets is None else targets, _compile(dt if targets is None else targets, t_src),
                    strict=True))
    ipat = list(zip(di if ignore is None else ignore, _compile(di if ignore is None else ignore, i_src),
                    strict=True))
    places = classify_modules(inner)
    mha = _mha_owned(inner)
    out = []
    for name, mod in linear_layers(inner).items():
        place = places.get(name, Placement("other", "other"))
        hit = next((p for p, c in tpat if c.search(name)), None)
        miss = next((p for p, c in ipat if c.search(name)), None)
        if name in mha:
            selected, rule = False, MHA_REASON
        elif hit is None:
            selected, rule = False, f"no {t_src} pattern matches"
        elif miss is not None:
            selected, rule = False, f"{i_src}: {miss}"
        else:
            selected, rule = True, f"{t_src}: {hit}"
        es = mod.weight.element_size() if isinstance(mod, nn.Linear) else mod.element_size
        bias = getattr(mod, "bias", None) is not None
        dense = (mod.out_features * mod.in_features + (mod.out_features if bias else 0)) * es
        out.append(LayerMatch(name, type(mod).__name__, place.tower, place.position, mod.out_features,
                              mod.in_features, dense, selected, rule))
    return out


def select(model: nn.Module, targets: Sequence[str] | None = None, ignore: Sequence[str] | None = None,
           check: bool = True) -> list[str]:
    """Names of the Linear layers the patterns select (what stages act on)."""
    return [m.name for m in match_layers(model, targets, ignore, check) if m.selected]


def check_section_patterns(model: nn.Module, section: Any) -> None:
    """:func:`check_patterns` for every stage of a compression section, the error naming it (``compression.quant``).

    Every stage is checked, not only those in ``cascade.stages``: a rate plan brings in the stages
    it needs (``quant`` for bits), with their patterns.
    """
    for st in type(section).model_fields:
        cfg = getattr(section, st, None)
        if cfg is not None and hasattr(cfg, "targets") and hasattr(cfg, "ignore"):
            check_patterns(model, cfg.targets, cfg.ignore, where=f"compression.{st}")
