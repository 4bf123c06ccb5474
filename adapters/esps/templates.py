"""Mailchimp merge-tag templates, rendered the way a campaign would show them.

``*|TAG|*`` is replaced by the member's value (empty when missing), whichever ESP the
member is for (the tag is the target's own field name);
``*|IF:TAG|*…*|ELSE:|*…*|END:IF|*`` and ``*|IFNOT:TAG|*…*|END:IF|*`` give the
fallbacks Mailchimp offers for missing values. Blocks nest. Pure.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

from schemas.events import Scalar

# Tags as the target names them: FNAME, first_name, location.city, ltv…
TOKEN = re.compile(r"\*\|(IF|IFNOT|ELSE|END):?([A-Za-z0-9_.]*)\|\*|\*\|([A-Za-z0-9_.]+)\|\*")


class TemplateError(ValueError):
    """An IF without its END:IF, or an ELSE/END:IF without an IF."""


def render(template: str, fields: Mapping[str, Scalar], *, escape: bool = False) -> str:
    """Render ``template`` for a member whose merge fields are ``fields``."""
    out: list[str] = []
    # Each frame: (showing this branch?, was the enclosing context showing?)
    stack: list[tuple[bool, bool]] = []
    showing = True
    position = 0
    for match in TOKEN.finditer(template):
        if showing:
            out.append(template[position:match.start()])
        position = match.end()
        keyword, condition, tag = match.groups()
        if tag is not None and keyword is None:
            if showing:
                value = fields.get(tag)
                text = "" if value is None else str(value)
                out.append(html.escape(text) if escape else text)
        elif keyword in ("IF", "IFNOT"):
            truthy = fields.get(condition) not in (None, "", 0, False)
            branch = truthy if keyword == "IF" else not truthy
            stack.append((branch, showing))
            showing = showing and branch
        elif keyword == "ELSE":
            if not stack:
                raise TemplateError("*|ELSE:|* without *|IF:…|*")
            branch, outer = stack[-1]
            stack[-1] = (not branch, outer)
            showing = outer and not branch
        else:
            if not stack:
                raise TemplateError("*|END:IF|* without *|IF:…|*")
            _, showing = stack.pop()
    if stack:
        raise TemplateError("*|IF:…|* without *|END:IF|*")
    if showing:
        out.append(template[position:])
    return "".join(out)
