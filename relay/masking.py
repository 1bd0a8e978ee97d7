"""How a secret is hidden wherever the relay prints something: one mask, one URL masker, one
token pattern, shared by the configuration (`relay check`), the logs, stored bad frames and
store names, so that they cannot drift apart.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["MASK", "mask_long_hex", "mask_url", "url_secrets"]

MASK = "***"

#: Candidates for what sFOX user tokens look like: runs of 32 or more hex digits.
_HEX_RUN = re.compile(r"[0-9a-fA-F]{32,}")
_WORD = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")


def mask_long_hex(text: str, mask: str = MASK) -> str:
    """``text`` with every user-token-shaped value (a run of 32+ hex digits) replaced.

    Event ids (``evt_`` + hex) are not secrets, so a run glued to a word character is left
    alone, except after a JSON escape such as ``\\n``. Candidates are found by one plain scan
    and their edges checked here: a single regex with lookbehinds tried at every position
    cost every log line several microseconds.
    """
    pieces: list[str] = []
    last = 0
    for run in _HEX_RUN.finditer(text):
        start, end = run.span()
        before = text[start - 1] if start else ""
        if before in _WORD and not (before in "nrt" and text[start - 2 : start - 1] == "\\"):
            continue
        if end < len(text) and text[end] in _WORD and text[end] != "_":
            continue
        pieces += [text[last:start], mask]
        last = end
    if not pieces:
        return text
    pieces.append(text[last:])
    return "".join(pieces)


#: Query parameters that hold a credential even in a URL whose other parameters are settings.
_SECRET_PARAMS = frozenset({"password", "pass", "token", "secret", "key", "api_key", "apikey"})


def _query(query: str, *, all_values: bool) -> str:
    pieces = []
    for piece in query.split("&") if query else []:
        name, eq, _ = piece.partition("=")
        if not eq:
            pieces.append(MASK if all_values else piece)
        elif all_values or name.lower() in _SECRET_PARAMS:
            pieces.append(f"{name}={MASK}")
        else:
            pieces.append(piece)
    return "&".join(pieces)


def mask_url(url: str, *, strict: bool = False) -> str:
    """``url`` as it may be printed, credentials masked.

    Always: a password, and query values whose name says credential (``password``,
    ``token``...). ``strict`` (endpoint and sFOX URLs, where a lone user info or any query
    value may be a token): the whole user info, every query value, and the fragment. Not
    strict (store URLs): a user name is kept, since it names an account
    (``postgresql://relay:***@db/relay``). Unparsable text is masked whole, never echoed.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    userinfo, at, host = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at:
        netloc = host
    elif strict:
        netloc = f"{MASK}@{host}"
    else:
        netloc = f"{user}:{MASK}@{host}" if colon else f"{user}@{host}"
    query = _query(parts.query, all_values=strict)
    fragment = "" if strict else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return url  # nothing to hide: exactly as given (urlunsplit would drop sqlite's //)
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def url_secrets(url: str, *, strict: bool = False) -> list[str]:
    """The credentials inside ``url`` (raw and percent-decoded) for the log redactor, as
    :func:`mask_url` sees them: a password, credential-named query values, and with
    ``strict`` the whole user info and every query value."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, colon, password = userinfo.partition(":")
        if colon:
            found += [password, unquote(password)]
        if strict:
            found += [userinfo, user, unquote(user)]
    for piece in parts.query.split("&") if parts.query else []:
        name, _, value = piece.partition("=")
        if (strict and len(value) >= 8) or name.lower() in _SECRET_PARAMS:
            found += [value, unquote(value)]
    return [text for text in found if text]
