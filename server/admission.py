"""Who may open the chat websocket, decided before the upgrade; the socket that keeps the time.

``Admission`` is the gateway's ``process_request``. A handshake gets

1. HTTP 403 when its ``Origin`` is not allowed (``server.allowed_origins``, the sites', the demo's);
2. HTTP 401 (``WWW-Authenticate: Bearer``) when ``server.token`` is set and the handshake does
   not carry it: ``Authorization: Bearer TOKEN`` from a program, or, from a browser (which
   cannot set headers on a websocket), the subprotocols ``learnloop.v1`` and
   ``learnloop.bearer.`` + base64url(TOKEN) without padding; the server answers ``learnloop.v1``
   and never echoes the token. Only a page of a configured widget site (``[sites.NAME]``) may
   come without it: a public page cannot keep a secret, and its ``hello`` must then name the
   site, whose own checks decide (``server/channels/identity.py``). A token in the URL is not
   read: proxies and access logs keep URLs;
3. HTTP 400 when it repeats ``Origin`` or ``Authorization`` (one warning line, no traceback);
4. HTTP 429 (``Retry-After``) when its client address (see ``client_address``; behind a proxy in
   ``server.trusted_proxies``, the forwarded one) already holds ``server.max_connections_per_address``
   websockets (handshakes in progress count; a connection is forgotten when it closes).

No session exists before the upgrade, so a refused handshake costs no store write. The token is
compared in constant time and never logged.

``ChatSocket`` is the gateway's connection class: it remembers what the handshake proved and
when the client last sent a frame (a pong does not count: it answers the server's ping, so it
shows only that the peer is alive, which the keepalive already checks).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

log = logging.getLogger("learnloop.gateway")

SUBPROTOCOL = Subprotocol("learnloop.v1")
BEARER_PREFIX = "learnloop.bearer."
IDLE_CLOSE = 4408  # nothing heard for server.idle_timeout_s
RETRY_AFTER_S = 5  # what a refused handshake (429) and a refused hello (per-user cap) ask a client to wait


class ChatSocket(ServerConnection):
    """A gateway connection: its handshake's findings and the time of the client's last frame."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authenticated = False  # the handshake carried server.token (or none is set)
        self.address: str | None = None  # the client address it counts against
        self.heard = time.monotonic()  # the client's last frame other than a pong

    def process_event(self, event: Any) -> None:
        super().process_event(event)
        if isinstance(event, Frame) and event.opcode is not Opcode.PONG:
            self.heard = time.monotonic()


def presented_token(headers: Headers) -> str | None:
    """The token a handshake carries: ``Authorization: Bearer`` or a ``learnloop.bearer.*`` subprotocol.

    The caller has refused a handshake with more than one ``Authorization`` header."""
    values = headers.get_all("Authorization")
    auth = values[0] if values else None
    if auth is not None:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for offered in _offered(headers):
        if offered.startswith(BEARER_PREFIX):
            encoded = offered[len(BEARER_PREFIX) :]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError):
                return ""  # presented, and wrong
    return None


def bearer_subprotocol(token: str) -> str:
    """The subprotocol a browser offers (beside ``learnloop.v1``) to carry ``token``."""
    return BEARER_PREFIX + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as written in a peer or an ``X-Forwarded-For`` entry (``1.2.3.4:80``, ``[::1]:80``)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 has several colons
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def proxy_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """``server.trusted_proxies`` parsed; ValueError names an entry that is no address or CIDR network."""
    try:
        return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)
    except ValueError as exc:
        raise ValueError(f"{exc}: write an IP address or a CIDR network") from None


def client_address(peer: Any, headers: Headers, trusted: Sequence[Network] = LOOPBACK) -> str:
    """The address a connection counts against: the peer's, or when the peer is a trusted proxy the
    right-most ``X-Forwarded-For`` entry that is not itself one (what the nearest untrusted hop was)."""
    host = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)

    def is_trusted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in net for net in trusted if ip.version == net.version)

    if not is_trusted(_ip(host)):
        return host
    entries = [e.strip() for value in headers.get_all("X-Forwarded-For") for e in value.split(",") if e.strip()]
    for entry in reversed(entries):
        ip = _ip(entry)
        if ip is None:
            return entry  # not an address (``unknown``, a token): counted as written, never trusted
        if not is_trusted(ip):
            return str(ip)
    return str(_ip(entries[0])) if entries else host  # every hop a trusted proxy: the first one


def _offered(headers: Headers) -> list[str]:
    return [p.strip() for value in headers.get_all("Sec-WebSocket-Protocol") for p in value.split(",") if p.strip()]


class Admission:
    """The gateway's handshake checks (``process_request``) and its per-address count."""

    def __init__(
        self,
        *,
        token: str | None,
        origin_allowed: Callable[[str | None], bool],
        site_origin: Callable[[str | None], bool],
        max_per_address: int,
        trusted_proxies: Sequence[str] = ("127.0.0.0/8", "::1"),
    ) -> None:
        self.token = token
        self.trusted_proxies = proxy_networks(trusted_proxies)
        self.origin_allowed = origin_allowed
        self.site_origin = site_origin
        self.max_per_address = max_per_address
        self._by_address: dict[str, set[ChatSocket]] = {}

    def open_from(self, address: str) -> int:
        """Websockets open (or opening) from ``address`` (tracked only under a cap)."""
        sockets = self._by_address.get(address)
        if sockets is None:
            return 0
        sockets -= {s for s in sockets if s.state is State.CLOSED}
        if not sockets:
            del self._by_address[address]
        return len(sockets)

    def check(self, connection: ServerConnection, request: Request) -> Response | None:
        """None lets the handshake go on; a Response refuses it before any session exists."""
        assert isinstance(connection, ChatSocket)
        for name in ("Origin", "Authorization"):
            if len(request.headers.get_all(name)) > 1:  # ``Headers.get`` would raise: HTTP 500 and a traceback
                log.warning("websocket handshake refused: more than one %s header", name)
                return connection.respond(HTTPStatus.BAD_REQUEST, f"send one {name} header\n")
        origin = request.headers.get("Origin")
        if not self.origin_allowed(origin):
            log.warning("websocket handshake refused: Origin %r is not allowed", origin)
            return connection.respond(HTTPStatus.FORBIDDEN, "this Origin may not open the chat\n")
        if self.token is None:
            connection.authenticated = True
        else:
            presented = presented_token(request.headers)
            if presented is not None and hmac.compare_digest(presented.encode(), self.token.encode()):
                connection.authenticated = True
            elif presented is not None or not self.site_origin(origin):
                log.warning("websocket handshake refused: the token is %s", "wrong" if presented else "missing")
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "send server.token: Authorization: Bearer\n")
                response.headers["WWW-Authenticate"] = 'Bearer realm="learnloop"'
                return response
        address = client_address(connection.remote_address, request.headers, self.trusted_proxies)
        if self.max_per_address and self.open_from(address) >= self.max_per_address:
            log.warning("websocket handshake refused: %d connections from one address", self.max_per_address)
            response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from this address\n")
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        connection.address = address
        if self.max_per_address:  # counted only under a cap; forgotten when the connection ends
            self._by_address.setdefault(address, set()).add(connection)
            connection.connection_lost_waiter.add_done_callback(lambda _: self._forget(address, connection))
        return None

    def _forget(self, address: str, connection: ChatSocket) -> None:
        sockets = self._by_address.get(address)
        if sockets is not None:
            sockets.discard(connection)
            if not sockets:
                del self._by_address[address]

    def select_subprotocol(self, connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        """``learnloop.v1`` when offered (a browser carrying its token offers it); never the bearer one."""
        return SUBPROTOCOL if SUBPROTOCOL in offered else None
