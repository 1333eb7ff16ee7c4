"""Bearer keys: every key is compared, in constant time, on every request."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from ..errors import AuthenticationError
from .config import ANONYMOUS, ApiKey

_MISSING = "this server needs an API key: send the header `Authorization: Bearer <key>`"
_WRONG = "the API key is not valid on this server"


def key_name(keys: Sequence[ApiKey], headers: Mapping[str, str]) -> str:
    """The name of the key the request presents; ``AuthenticationError`` if none matches.
    Without configured keys every request is ``anonymous`` (the server is on loopback)."""
    if not keys:
        return ANONYMOUS
    scheme, _, presented = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise AuthenticationError(_MISSING)
    digest = hashlib.sha256(presented.strip().encode()).digest()
    found = ""
    for key in keys:  # no early exit: the time does not depend on which key matched
        if hmac.compare_digest(digest, key.digest):
            found = key.name
    if not found:
        raise AuthenticationError(_WRONG)
    return found
