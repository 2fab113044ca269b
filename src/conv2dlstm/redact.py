"""Secrets in URLs: what counts as one, and the one redaction every log line, error and manifest uses.

Credentials never belong in the configuration: http(s) downloads take them from ``~/.netrc`` (or
the file named by ``NETRC``), object stores from their own environment variables or files, and a
query token from an environment variable named as the parameter's whole value, ``?token=$NAME``
(resolved only when the request is made, :func:`resolve_env_refs`). :mod:`conv2dlstm.config.validate`
refuses a URL that carries a secret itself (:func:`url_secret_problem`).

As defence in depth, everything that writes or logs a URL, or an error message that may quote one
(from requests, aiohttp, fsspec), passes it through :func:`redact_text`: the user info of a URL
(``user:password@`` or ``token@``) and the values of query parameters whose names look like
secrets (:func:`is_secret_name`) become ``***``; ``$NAME`` references, which name a variable and
hold no secret, are kept. The literal values of the environment variables that
:func:`resolve_env_refs` resolved in this process are replaced too, wherever they appear.

Only the standard library is imported: :mod:`conv2dlstm.config.validate`, which the Snakefile imports,
uses this module.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping
from types import TracebackType

REDACTED = "***"
SECRET_NAMES = frozenset({"key", "sig", "pass", "pwd", "auth", "authorization", "jwt", "code"})
"""Query parameter names that are secrets as a whole (compared lower-cased; ``code``: OAuth
authorization codes and Azure Functions keys)."""
SECRET_NAME_PARTS = (
    "token",
    "secret",
    "password",
    "passwd",
    "signature",
    "credential",
    "apikey",
    "api_key",
    "api-key",
    "accesskey",
    "access_key",
    "access-key",
    "private",
    "session",
)
"""Query parameter names containing one of these (lower-cased) are secrets: ``access_token``,
``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``client_secret``, ..."""
SECRET_NAME_SUFFIXES = ("_key", "-key", ".key")
"""Names ending so are secrets too (``subscription-key``, ``x_api_key``), not ``keyword`` or ``monkey``."""

ENV_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
"""A query parameter's whole value ``$NAME``: the environment variable NAME, resolved when the
request is made. It has no braces, so a URL template's ``str.format`` leaves it alone."""
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"<>]*)@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#?\s'\"<>/]+)=(?P<value>[^&;#\s'\"<>)]*)")
_TRAILING = ".,:;!?"
_AUTH_HEADER = re.compile(
    r"(?P<head>\b(?:Proxy-)?Authorization['\"]?\s*[:=]\s*['\"]?(?:[A-Za-z]+\s+)?)[^\s'\",}]+", re.I
)

_resolved: set[str] = set()
_resolved_lock = threading.Lock()


def is_secret_name(name: str) -> bool:
    """Whether a query parameter named ``name`` carries a secret (:data:`SECRET_NAMES`,
    :data:`SECRET_NAME_PARTS`, :data:`SECRET_NAME_SUFFIXES`; case-insensitive)."""
    lower = urllib.parse.unquote(name).strip().lower()
    return (
        lower in SECRET_NAMES
        or any(part in lower for part in SECRET_NAME_PARTS)
        or lower.endswith(SECRET_NAME_SUFFIXES)
    )


def _redact_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    shown = f"{user}:{REDACTED}" if colon else REDACTED
    return f"{match['scheme']}{shown}@"


def _redact_param(match: re.Match[str]) -> str:
    """``=***`` for a secret-looking parameter's value; punctuation that ends it is taken to end
    the sentence around the URL (``...?token=$T: failed``) and kept."""
    value = match["value"]
    core = value.rstrip(_TRAILING)
    if not core or not is_secret_name(match["name"]) or ENV_REF.fullmatch(core):
        return match[0]
    return f"{match['lead']}{match['name']}={REDACTED}{value[len(core) :]}"


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret it may hold replaced by ``***``.

    Replaced: the user info of each URL (``https://user:pw@host`` -> ``https://user:***@host``,
    ``https://tok@host`` -> ``https://***@host``); the value of each query parameter whose name
    looks secret (``?token=abc`` -> ``?token=***``, also in a bare path such as requests quotes,
    ``url: /a.nc?sig=abc``; a ``$NAME`` reference is kept); the credentials of an
    ``Authorization`` header; each value of ``secrets`` and of the environment variables resolved
    by :func:`resolve_env_refs` (as is and URL-quoted), wherever it appears.
    """
    text = _URL_USERINFO.sub(_redact_userinfo, str(text))
    text = _QUERY_PARAM.sub(_redact_param, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['head']}{REDACTED}", text)
    with _resolved_lock:
        values = {*_resolved, *secrets}
    for value in sorted((v for v in values if len(v) >= 4), key=len, reverse=True):
        for form in {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}:
            text = text.replace(form, REDACTED)
    return text


def redact_url(url: str) -> str:
    """A URL fit to log, print or write down (:func:`redact_text` of it)."""
    return redact_text(url)


def userinfo(url: str) -> str | None:
    """The user info of ``url`` (``user:password`` in ``scheme://user:password@host/``), or None."""
    match = _URL_USERINFO.match(url.strip())
    return match["userinfo"] if match else None


def _split_query(url: str) -> tuple[str, str, str]:
    """``url`` as (what precedes the query, the query with its ``?``, the fragment with its ``#``)."""
    head, hash_, fragment = url.partition("#")
    base, question, query = head.partition("?")
    return base, question + query, hash_ + fragment


def secret_query_params(url: str) -> list[str]:
    """Names of the query parameters of ``url`` that look secret and hold a literal value (not a
    ``$NAME`` reference), in order."""
    names = []
    for match in _QUERY_PARAM.finditer(_split_query(url)[1]):
        value = match["value"]
        if value and is_secret_name(match["name"]) and not ENV_REF.fullmatch(value):
            names.append(urllib.parse.unquote(match["name"]))
    return names


def url_secret_problem(url: str) -> str | None:
    """What secret ``url`` writes down (its user info, or literal secret query parameters), shown
    redacted, or None when it holds none."""
    info = userinfo(url)
    if info:
        shown = f"{info.partition(':')[0]}:{REDACTED}" if ":" in info else REDACTED
        return f"user info {shown!r} (credentials written in the URL)"
    names = secret_query_params(url)
    if names:
        return f"query parameter(s) {', '.join(names)} with a literal value (a secret written in the URL)"
    return None


def env_refs(url: str) -> list[str]:
    """Names of the environment variables that query parameters of ``url`` reference as their whole
    value (``?token=$NAME``), in order."""
    return list(
        dict.fromkeys(
            m["value"][1:] for m in _QUERY_PARAM.finditer(_split_query(url)[1]) if ENV_REF.fullmatch(m["value"])
        )
    )


def resolve_env_refs(url: str, environ: Mapping[str, str] | None = None) -> str:
    """``url`` with each query parameter value ``$NAME`` replaced by the URL-quoted value of the
    environment variable NAME; the values are remembered, so :func:`redact_text` hides them from
    then on. A variable that is not set raises ``KeyError`` naming it."""
    environ = os.environ if environ is None else environ

    def resolve(match: re.Match[str]) -> str:
        if not ENV_REF.fullmatch(match["value"]):
            return match[0]
        name = match["value"][1:]
        if name not in environ:
            raise KeyError(name)
        secret = environ[name]
        with _resolved_lock:
            _resolved.add(secret)
        return f"{match['lead']}{match['name']}={urllib.parse.quote(secret, safe='')}"

    base, query, fragment = _split_query(url)
    return base + _QUERY_PARAM.sub(resolve, query) + fragment


class RedactingFilter(logging.Filter):
    """A logging filter that passes every record's message, and its traceback, through
    :func:`redact_text`. On a logger it sees that logger's own records; on a handler, every record
    the handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redacting_excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """A :data:`sys.excepthook` that prints an uncaught exception's traceback redacted."""
    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))
