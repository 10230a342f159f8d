"""The chat widget: ``/widget.js`` (one script tag on any page gives a chat bubble) and its demo page.

``widget.js`` is a static file (no build step). It is served with a strong ETag made from its
bytes (a changed file gets a new one, so revalidation never serves a stale copy), gzipped
for clients that accept it, and ``/widget.js?v=<etag>`` may be cached for a year. The demo
page at ``/`` embeds it with the same one tag a shop uses, under a strict
Content-Security-Policy, and talks to the gateway as the built-in site ``demo``.
"""

from __future__ import annotations

import gzip
import hashlib
import html
from dataclasses import dataclass
from pathlib import Path
from string import Template

from fastapi import APIRouter, Request, Response

from feedback.exceptions import ErrorCode
from server.errors import ApiError
from server.settings import Settings, SiteConfig

STATIC = Path(__file__).parent / "static"
DEMO_SITE = "demo"
CACHE_SHORT = "public, max-age=600"  # the plain URL: an upgraded widget reaches pages within minutes
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"  # ?v=<etag>: these bytes never change
DEMO_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "require-trusted-types-for 'script'"
)


@dataclass(frozen=True)
class Asset:
    """A static file with its gzipped form and their strong ETags."""

    body: bytes
    gzipped: bytes
    version: str  # from the content: changes whenever the bytes do
    media_type: str

    @classmethod
    def load(cls, path: Path, media_type: str) -> Asset:
        body = path.read_bytes()
        return cls(body, gzip.compress(body, 9, mtime=0), hashlib.sha256(body).hexdigest()[:20], media_type)

    def respond(self, request: Request, *, cache: str) -> Response:
        use_gzip = "gzip" in request.headers.get("accept-encoding", "").lower()
        etag = f'"{self.version}-gz"' if use_gzip else f'"{self.version}"'  # one ETag per representation
        headers = {
            "ETag": etag,
            "Cache-Control": cache,
            "Vary": "Accept-Encoding",
            # any shop's page may load it, also one that isolates itself (COEP)
            "Cross-Origin-Resource-Policy": "cross-origin",
            "Access-Control-Allow-Origin": "*",
        }
        if etag in (t.strip() for t in request.headers.get("if-none-match", "").split(",")):
            return Response(status_code=304, headers=headers)
        if use_gzip:
            headers["Content-Encoding"] = "gzip"
        return Response(self.gzipped if use_gzip else self.body, media_type=self.media_type, headers=headers)


def demo_enabled(settings: Settings) -> bool:
    """The demo's site has no secret to stand in for ``server.token``: with a token set it is off."""
    return settings.channels.enabled and settings.channels.demo and settings.server.token is None


def demo_site(port: int) -> SiteConfig:
    """The built-in site of the demo page: its own loopback origins only."""
    hosts = ("127.0.0.1", "localhost", "[::1]")
    return SiteConfig(origins=tuple(f"http://{host}:{port}" for host in hosts))


def find_site(settings: Settings, name: str, *, channels_port: int | None) -> SiteConfig | None:
    """The site a widget's hello names: ``[sites.NAME]``, else the demo's while the demo page is served."""
    configured = settings.sites.get(name)
    if configured is not None:
        return configured
    if name == DEMO_SITE and channels_port is not None and demo_enabled(settings):
        return demo_site(channels_port)
    return None


def script_tag(src: str, attributes: dict[str, str]) -> str:
    """The one tag a page needs: ``<script src=... data-...=... async></script>``."""
    attrs = "".join(f' {name}="{html.escape(value)}"' for name, value in attributes.items())
    return f'<script src="{html.escape(src)}"{attrs} async></script>'


def widget_router(*, gateway_port: int, demo: bool) -> APIRouter:
    """``/widget.js``, and with ``demo`` the demo page at ``/`` (``/demo`` too) and its stylesheet."""
    router = APIRouter()
    widget = Asset.load(STATIC / "widget.js", "text/javascript")
    demo_css = Asset.load(STATIC / "demo.css", "text/css")
    page = Template((STATIC / "demo.html").read_text())

    @router.get("/widget.js", include_in_schema=False)
    async def widget_js(request: Request, v: str | None = None) -> Response:
        return widget.respond(request, cache=CACHE_IMMUTABLE if v == widget.version else CACHE_SHORT)

    if not demo:
        return router

    @router.get("/demo.css", include_in_schema=False)
    async def stylesheet(request: Request) -> Response:
        return demo_css.respond(request, cache=CACHE_SHORT)

    @router.get("/", include_in_schema=False)
    @router.get("/demo", include_in_schema=False)
    async def demo_page(request: Request, lang: str | None = None, theme: str | None = None) -> Response:
        if lang not in (None, "en", "zh") or theme not in (None, "light", "dark", "auto"):
            raise ApiError("lang is en or zh; theme is light, dark or auto", code=ErrorCode.BAD_REQUEST)
        host = request.url.hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        scheme = "wss" if request.url.scheme == "https" else "ws"
        attributes = {"data-server": f"{scheme}://{host}:{gateway_port}", "data-site": DEMO_SITE}
        attributes |= {"data-lang": lang} if lang else {}
        attributes |= {"data-theme": theme} if theme else {}
        tag = script_tag("/widget.js", attributes)
        body = page.substitute(lang=lang or "en", tag=tag, tag_text=html.escape(tag))
        headers = {"Content-Security-Policy": DEMO_CSP, "Cache-Control": "no-store", "X-Frame-Options": "DENY"}
        return Response(body, media_type="text/html", headers=headers)

    return router
