"""MkDocs hook: render the formulas of arithmatex as MathML at build time.

Browsers draw MathML natively, so the site needs no JavaScript math renderer and no network,
neither to build nor to read. A formula latex2mathml cannot convert fails the build.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

# pymdownx.arithmatex (generic mode) wraps inline math as \(...\) and display math as \[...\].
_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>',
    re.DOTALL,
)


def _render(match: re.Match[str]) -> str:
    block = match.group("block")
    tex = html.unescape(block if block is not None else match.group("inline"))
    return convert(tex.strip(), display="block" if block is not None else "inline")


def on_page_content(content: str, **kwargs: object) -> str:
    return _MATH.sub(_render, content)
