"""Who may open a widget conversation: site origins and verified user ids. Pure: no I/O.

A hello that names a site (``hello {site, user?, user_hash?}``) is admitted when

1. the site is configured (``[sites.NAME]``), else ``not_found``;
2. the websocket handshake's ``Origin`` is one of the site's origins, else ``forbidden``
   (a browser always sends it and page scripts cannot change it);
3. either no ``user`` is named (the visitor is anonymous: the conversation is the rater), or
   ``user_hash`` is the hex HMAC-SHA256 of the user id under the site's secret, which only
   the shop's own server knows (Intercom and Chatwoot verify identities the same way), else
   ``unauthorized``. A site without a secret cannot vouch for anyone: naming a user is refused.

A shop computes the hash on its server, never in the page::

    hmac.new(secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from feedback.exceptions import ErrorCode, LearnloopError

if TYPE_CHECKING:
    from server.settings import SiteConfig


class IdentityError(LearnloopError):
    """A widget hello is refused; its code goes to the client in an ``error`` frame."""

    public = True


@dataclass(frozen=True)
class Admission:
    site: str
    user: str | None  # a verified user id, or None: anonymous


def user_hash(secret: str, user: str) -> str:
    """The hex HMAC-SHA256 of ``user`` under ``secret``: what ``data-user-hash`` carries."""
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()


def verify_user_hash(secret: str, user: str, claimed: str) -> bool:
    """Does ``claimed`` match ``user``'s hash? Constant-time in the claimed value; hex case-insensitive."""
    expected = user_hash(secret, user).encode()
    return hmac.compare_digest(expected, claimed.strip().lower().encode())


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None if it is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.query or parts.fragment or parts.username or parts.password:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def origin_allowed(origins: Iterable[str], origin: str | None) -> bool:
    """Is the handshake's ``Origin`` one of ``origins`` (already normalized)? A missing one never is."""
    if origin is None:
        return False
    normalized = normalize_origin(origin)
    return normalized is not None and normalized in set(origins)


def admit(
    site: SiteConfig | None, *, name: str, origin: str | None, user: str | None, claimed_hash: str | None
) -> Admission:
    """Decide a hello that names the site ``name``; raises IdentityError with the code to send."""
    if site is None:
        raise IdentityError(f"no site {name!r} is configured", code=ErrorCode.NOT_FOUND)
    if not origin_allowed(site.origins, origin):
        raise IdentityError(f"origin {origin or '(none)'} may not open site {name!r}", code=ErrorCode.FORBIDDEN)
    if user is None:
        if claimed_hash is not None:
            raise IdentityError("user_hash needs a user", code=ErrorCode.BAD_REQUEST)
        return Admission(name, None)
    if site.secret is None:
        raise IdentityError(
            f"site {name!r} has no secret, so it cannot vouch for a user: leave user out", code=ErrorCode.UNAUTHORIZED
        )
    if claimed_hash is None or not verify_user_hash(site.secret.reveal(), user, claimed_hash):
        raise IdentityError("user_hash does not match user", code=ErrorCode.UNAUTHORIZED)
    return Admission(name, user)
