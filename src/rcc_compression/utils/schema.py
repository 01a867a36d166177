"""The base of every typed config model, and the one-line messages of its validation errors.

Each layer owns the config models of its own parts (a stage's config sits in the stage's module,
the trainer's in ``training``); :mod:`rcc_compression.config` assembles them into the file format.
The error formatting lives here, below all of them, so that a stage validated on its own
(``add_stage("dare", {...})``) reports exactly what a config file would.
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

KeyPath = tuple[str | int, ...]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 4, 4, 4, 4


def short(value: Any) -> str:
    """A bounded one-line repr of a bad value (YAML aliases can make values huge or self-containing)."""
    text = _REPR.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def show(path: Any) -> str:
    """A path or key path for a one-line message: as is when printable and short, else a bounded repr."""
    text = str(path)
    return text if text.isprintable() and len(text) <= 300 else short(text)


def fmt_path(path: KeyPath) -> str:
    """``("compression", "dare", "rate")`` -> ``compression.dare.rate``; list indices as ``[i]``."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def model_at(root: type[BaseModel], path: KeyPath) -> type[BaseModel] | None:
    """The config model found at ``path`` below ``root`` (``None`` when the path leaves the models)."""
    model: Any = root
    for p in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(p))
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


_EXPECTED = {
    "float_parsing": "expected a number", "float_type": "expected a number",
    "int_parsing": "expected an integer", "int_type": "expected an integer", "int_from_float": "expected an integer",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
    "model_type": "expected a mapping", "model_attributes_type": "expected a mapping",
}


def _is_tag(p: Any) -> bool:
    """Whether a pydantic error location entry names a union member (``list[str]``, ``function-after[...]``)."""
    return isinstance(p, str) and ("[" in p or p.startswith("function"))


def _type_name(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def error_line(err: Mapping[str, Any], prov: Mapping[KeyPath, str], default_file: str, root: type[BaseModel],
               prefix: KeyPath = (), rename: Callable[[KeyPath, str], KeyPath] | None = None) -> str:
    """One line for a pydantic error: ``config error: FILE: KEY.PATH: what is wrong; what is allowed``.

    ``root`` is the model that was validated; ``prefix`` is where it sits in a config file (a stage
    validated alone sits at ``("compression", name)``), so the key path reads as in the file.
    ``prov`` maps key paths to the file that set them; ``rename(path, file)`` gives the path as that
    file spells it (a section nested under ``experiment``).
    """
    raw: KeyPath = tuple(err["loc"])
    rel: KeyPath = tuple(p for p in raw if not _is_tag(p))
    if err["type"] == "extra_forbidden" and raw:  # the refused key is the user's, whatever it looks like
        rel = (*tuple(p for p in raw[:-1] if not _is_tag(p)), raw[-1])
    loc = (*prefix, *rel)
    file = default_file
    for n in range(len(loc), 0, -1):
        if loc[:n] in prov:
            file = prov[loc[:n]]
            break
    etype, value = err["type"], err.get("input")
    shown = rename(loc, file) if rename is not None else loc
    where = f"config error: {show(file)}: {show(fmt_path(shown))}:"
    if etype == "extra_forbidden":
        parent = model_at(root, rel[:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{where} unknown key {short(rel[-1])}; allowed keys: {allowed}"
    if etype == "literal_error":
        return f"{where} got {short(value)}; allowed: {err.get('ctx', {}).get('expected', '?')}"
    if etype in _EXPECTED:
        field_model = model_at(root, rel[:-1])
        ann = ""
        if field_model is not None and str(rel[-1]) in field_model.model_fields:
            ann = f" ({_type_name(field_model.model_fields[str(rel[-1])].annotation)})"
        return f"{where} {_EXPECTED[etype]}{ann}, got {short(value)}"
    msg = " ".join(err["msg"].removeprefix("Value error, ").split())
    return f"{where} {msg}; got {short(value)}"
