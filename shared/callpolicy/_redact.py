"""One place that takes secrets out of text before it is shown: credentials in URLs.

Every message, log line, ``repr`` and event text that may carry a connection URL (a
Redis store's, a status command's argument, an exception a client library raised with
its URL in it) goes through :func:`redact`, so that a password is never printed.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

# scheme://userinfo@ — userinfo ends at the last "@" before the host (a password may
# itself hold "@" or ":"); it cannot hold "/", whitespace or quotes.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s'\"<>]*)@")
# password=... in a query string (redis-py reads ?password= too), up to & or whitespace.
_QUERY_SECRET = re.compile(r"(?P<name>[?&;](?:password|passwd|pass|pwd|token)=)[^&\s'\"<>]*", re.I)

MASK = "***"


def _userinfo(match: re.Match[str]) -> str:
    userinfo = match["userinfo"]
    user, colon, _password = userinfo.partition(":")
    # "user:password": the user stays (it helps to know which one); a lone name may be
    # a password given where a user is expected ("redis://secret@host"): masked too.
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match['scheme']}{shown}@"


def redact(text: str) -> str:
    """``text`` with every URL's password (and lone userinfo) and every ``password=``
    query value replaced by ``***``.

    >>> redact("cannot read redis://app:s3cret@10.0.0.5:6379/0?password=x&db=1")
    'cannot read redis://app:***@10.0.0.5:6379/0?password=***&db=1'
    >>> redact("redis://127.0.0.1:6379/0")
    'redis://127.0.0.1:6379/0'
    """
    if "@" not in text and "=" not in text:  # nothing to mask: the common case, cheap
        return text
    return _QUERY_SECRET.sub(rf"\g<name>{MASK}", _USERINFO.sub(_userinfo, text))
