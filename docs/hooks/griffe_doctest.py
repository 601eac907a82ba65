"""Griffe extension for the docs: render doctest examples as code.

Google-style ``Example:`` (singular) is an admonition whose body is Markdown, so a doctest line such
as ``>>> ds["text"][0]`` would be read as a Markdown reference link. When such a section holds
``>>>`` lines it is renamed ``Examples:``, which griffe parses into highlighted code blocks.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*\n(?=(?:[ \t]*\n)*[ \t]*>>>)", re.MULTILINE)


class DoctestExamples(griffe.Extension):
    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and "Example:" in doc.value:
            doc.value = _EXAMPLE.sub(lambda m: f"{m.group('indent')}Examples:\n", doc.value)
