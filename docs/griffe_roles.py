"""Griffe extension: Sphinx cross-reference roles in docstrings become Markdown code spans.

The docstrings use ``:class:`~pkg.mod.Name``` and friends; rendered as Markdown they would show
the role literally. ``:role:`~a.b.C``` becomes ``C`` and ``:role:`a.b.C``` becomes ``a.b.C``, in
code spans.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_plain, obj.docstring.value)
