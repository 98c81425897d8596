"""What a hospital is called outside it: a short plain site name, never a path fragment or an id."""
from __future__ import annotations

import re
import zlib

_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def safe_site(name: str, fallback_key: str = "") -> str:
    """The site name as it may leave the hospital: a short plain name, never a number that could be an id.
    Anything else (a path fragment, an 8-digit patient-like id) becomes `site-<crc32 of fallback_key>`."""
    name = str(name or "").strip()
    if _SITE.match(name) and not name.isdigit():
        return name
    return f"site-{zlib.crc32((fallback_key or name).encode()):08x}"
