"""Generate the site's reference pages and navigation at build time (mkdocs-gen-files).

* ``reference/api/<module>.md``: one page per public module under ``src/rcc_compression``, found by
  walking the package, so a new module appears without editing anything.
* ``reference/configuration.md``: every config key with its type, default and meaning, read from
  the pydantic models (``rcc_compression.config.RCCConfig``), so it cannot drift from the code.
* ``SUMMARY.md``: the navigation: home, the guides in reading order, every other page under
  ``docs/`` (found by walking it), then the reference.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = ROOT / "docs"
PACKAGE = "rcc_compression"

GUIDES = [
    ("Compress your own CLIP or BLIP", "guides/compress-your-model.md"),
    ("Compress a generative VLM (LLaVA) or a SigLIP", "guides/compress-a-generative-vlm.md"),
    ("Your own dataset", "guides/your-dataset.md"),
    ("Recovery training", "guides/recovery-training.md"),
    ("Data privacy", "guides/privacy.md"),
    ("Reading the results", "guides/reading-results.md"),
    ("The three stages and their papers", "guides/stages.md"),
    ("Notebooks", "guides/notebooks.md"),
]


# ------------------------------------------------------------------------------------ API pages
def public_modules() -> list[tuple[str, ...]]:
    """Dotted paths (as tuples) of every public module and package of the source tree."""
    out = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = tuple(rel.parts)
        if not all((SRC / Path(*parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
            continue  # a data directory, not a package
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif parts[-1].startswith("_"):
            continue
        if any(p.startswith("_") for p in parts):
            continue
        out.append(parts)
    return out


def write_api_pages() -> list[tuple[str, ...]]:
    modules = public_modules()
    for parts in modules:
        name = ".".join(parts)
        with mkdocs_gen_files.open(f"reference/api/{name}.md", "w") as fh:
            fh.write(f"::: {name}\n")
    return modules


# ---------------------------------------------------------------------------- configuration page
def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if ann is type(None):
        return "null"
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (list, tuple, dict, set):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _constraints(field: Any) -> str:
    marks = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("pattern", "matches")):
            value = getattr(m, attr, None)
            if value is not None:
                marks.append(f"{sym} `{value}`" if attr == "pattern" else f"{sym} {value}")
    return f" ({', '.join(marks)})" if marks else ""


def _default(field: Any) -> str:
    from pydantic import BaseModel

    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _submodel(ann: Any) -> Any:
    from pydantic import BaseModel

    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _doc(model: Any) -> str:
    doc = (model.__doc__ or "").strip()
    if not doc or doc.startswith(model.__name__ + "("):  # pydantic's generated docstring of create_model
        return ""
    return re.sub(r"``([^`]+)``", r"`\1`", doc)


def _section(lines: list[str], key: str, model: Any) -> None:
    lines += [f"## `{key}`", ""]
    doc = _doc(model)
    if doc:
        lines += [doc, ""]
    nested = []
    rows = []
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is not None:
            nested.append((f"{key}.{name}", sub))
            rows.append(f"| `{name}` | section | | see [`{key}.{name}`](#{(key + '.' + name).replace('.', '')}) |")
            continue
        meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{name}` | {_type_name(field.annotation)}{_constraints(field)} | {_default(field)} | "
                    f"{meaning} |")
    lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
    for sub_key, sub in nested:
        _section(lines, sub_key, sub)


def configuration_page() -> str:
    sys.path.insert(0, str(SRC))
    from rcc_compression.config import RCCConfig

    lines = [
        "# Configuration reference",
        "",
        "Every key of a run's YAML configuration, generated from the typed models in",
        "`rcc_compression.config` (and each stage's config class) when the site is built. Unknown keys",
        "are refused; `rcc config --config FILE` prints a file fully resolved. See the",
        "[guide to compressing your own model](../guides/compress-your-model.md) for how files inherit",
        "and override each other, and `--set key.path=value` on the command line.",
        "",
    ]
    for name, field in RCCConfig.model_fields.items():
        _section(lines, name, field.annotation)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- navigation
def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("_", " ").replace("-", " ").capitalize()


def summary(modules: list[tuple[str, ...]]) -> str:
    listed = {"index.md", *(p for _, p in GUIDES)}
    lines = ["* [Home](index.md)", "* Guides"]
    lines += [f"    * [{title}]({path})" for title, path in GUIDES if (DOCS / path).is_file()]
    others = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
                    if p.relative_to(DOCS).as_posix() not in listed and not p.name.startswith("_")
                    and p.relative_to(DOCS).parts[0] not in ("reference",))
    if others:
        lines.append("* Topics")
        lines += [f"    * [{_title(DOCS / p)}]({p})" for p in others]
    lines += ["* Reference", "    * [Configuration](reference/configuration.md)", "    * API"]
    packages = {m[:-1] for m in modules if len(m) > 1}

    def tree(prefix: tuple[str, ...], depth: int) -> None:
        pad = "    " * depth
        children = sorted((m for m in modules if m[:-1] == prefix), key=lambda m: (m in packages, m))
        if prefix in modules:
            lines.append(f"{pad}* [{'.'.join(prefix)}](reference/api/{'.'.join(prefix)}.md)")
        for child in children:
            if child in packages:
                lines.append(f"{pad}* {child[-1]}")
                tree(child, depth + 1)
            else:
                lines.append(f"{pad}* [{child[-1]}](reference/api/{'.'.join(child)}.md)")

    tree((PACKAGE,), 2)
    return "\n".join(lines) + "\n"


modules = write_api_pages()
with mkdocs_gen_files.open("reference/configuration.md", "w") as fh:
    fh.write(configuration_page())
with mkdocs_gen_files.open("SUMMARY.md", "w") as fh:
    fh.write(summary(modules))
