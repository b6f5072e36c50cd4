"""The operations HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz`` (aiohttp)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from e911_sip.metrics import CONTENT_TYPE, Metrics

Readiness = Callable[[], tuple[bool, dict[str, object]]]


def build_ops_app(*, metrics: Metrics, readiness: Readiness) -> web.Application:
    """An aiohttp application serving the three endpoints.

    ``/healthz`` answers 200 while the process runs its loop. ``/readyz`` answers 200 or 503
    with a JSON body saying why (listeners, store ok or degraded, draining).
    """

    async def metrics_handler(_: web.Request) -> web.Response:
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, details = readiness()
        return web.json_response(details, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
