"""Database roles for tests of least privilege and passwords."""

from __future__ import annotations

from urllib.parse import quote as url_quote
from urllib.parse import urlsplit, urlunsplit


def as_role(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{role}:{url_quote(password)}@{host}"))
