"""The dashboard's web server: aiohttp on a thread of its own, serving one page and its data.

    GET /                   the page (static/index.html)
    GET /static/NAME        its script, style and the vendored uPlot chart library (no CDN: offline)
    GET /api/state?since=T  every watched run (Collector.snapshot), with only the curve points
                            newer than T: the page asks every few seconds for what it lacks

It binds 127.0.0.1 unless told otherwise: the page shows peer IDs and addresses of a run, which
is not for everyone on the network. Strings on the page come from strangers in the DHT; the
script inserts them as text, never as HTML, and the Content-Security-Policy allows no script
but ours.
"""

from __future__ import annotations

import asyncio
import errno
import json
import math
import threading
from importlib import resources
from typing import TYPE_CHECKING

from hivecli._exceptions import ConfigError, HiveError

if TYPE_CHECKING:
    from aiohttp import web

    from hivecli.monitor.collector import Collector

STATIC = {  # name -> content type: the only files served
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _static(name: str) -> bytes:
    return resources.files("hivecli.monitor").joinpath("static", name).read_bytes()


def _app(collector: Collector) -> web.Application:
    from aiohttp import web

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "index.html")
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=STATIC[name], headers=HEADERS)

    async def state(request: web.Request) -> web.Response:
        try:
            since = float(request.query.get("since", "-inf"))
        except ValueError:
            raise web.HTTPBadRequest(text="since must be a number (a DHT time in seconds)") from None
        snapshot = collector.snapshot(since if not math.isnan(since) else -math.inf)
        return web.Response(
            text=json.dumps(snapshot, allow_nan=False),
            content_type="application/json",
            headers={**HEADERS, "Cache-Control": "no-store"},
        )

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", page)
    app.router.add_get("/api/state", state)
    return app


class DashboardServer:
    """Serves the dashboard of `collector` at http://HOST:PORT/ until `stop()`.

    Raises (from `start`):
        ConfigError: aiohttp is not installed, or HOST:PORT cannot be bound (in use, not ours).
    """

    def __init__(self, collector: Collector, host: str = "127.0.0.1", port: int = 8080):
        self.collector, self.host, self.port = collector, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> DashboardServer:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise ConfigError("the dashboard needs aiohttp: pip install 'aiohttp>=3.9'") from None
        self._thread = threading.Thread(target=self._serve, name="hive-dashboard", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise HiveError(f"the dashboard did not start on {self.host}:{self.port} within 30 s")
        if self._error is not None:
            self._thread.join(timeout=10)
            raise self._error
        return self

    def _serve(self) -> None:
        from aiohttp import web

        loop = self._loop = asyncio.new_event_loop()
        runner = web.AppRunner(_app(self.collector), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            sockets = getattr(site._server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]  # the real port when 0 asked for any
        except OSError as e:
            reason = "it is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            self._error = ConfigError(
                f"the dashboard cannot listen on {self.host}:{self.port} ({reason}); pass --port with another "
                f"port, or --port 0 for any free one"
            )
        except BaseException as e:  # reported to start()'s caller, not lost on this thread
            self._error = e
        self._ready.set()
        try:
            if self._error is None:
                loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
