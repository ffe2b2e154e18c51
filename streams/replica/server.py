"""One reader process: the changelog follower and the web views over it, on a plain aiohttp server.

The views are the workers' own (:func:`streams.serve.web.register_views`, the dashboard),
written as Faust views; :class:`ReaderHost` gives them what Faust's app and web server would
(``page`` and ``bytes``) without a Faust app: a reader joins no consumer group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web as aiohttp_web
from yarl import URL

from streams.replica.follower import ChangelogFollower
from streams.replica.source import ReplicaSource
from streams.runtime.settings import Settings
from streams.serve.http_errors import EnvelopeRunner, router_errors_in_envelope
from streams.serve.ingress import IngressProducer
from streams.serve.peer_secret import shared_peer_secret
from streams.serve.web_auth import guard_for
from streams.tracing.spans import tracer_for

log = logging.getLogger(__name__)

#: Seconds between updates of the replica lag gauges.
_METRICS_INTERVAL = 0.25


class ReaderHost:
    """Serves views written for Faust's ``app.page`` on an aiohttp application.

    A Faust view is made with the app and the web server it belongs to; here this host is both.
    """

    def __init__(self, source: ReplicaSource) -> None:
        self.view_source = source
        self.web_app = aiohttp_web.Application(middlewares=[router_errors_in_envelope])

    def page(self, path: str) -> Any:
        def register(view_class: Any) -> Any:
            view_class.view_name = view_class.__name__
            view_class.view_path = path
            view = view_class(self, self)

            async def handle(request: aiohttp_web.Request) -> Any:
                return await view(request)

            for method in view.get_methods():
                self.web_app.router.add_route(method, path, handle)
            return view_class

        return register

    def bytes(
        self,
        value: bytes,
        *,
        content_type: str | None = None,
        status: int = 200,
        reason: str | None = None,
        headers: Any = None,
    ) -> aiohttp_web.Response:
        return aiohttp_web.Response(
            body=value, content_type=content_type, status=status, reason=reason, headers=headers
        )


async def serve(settings: Settings, upstream: URL, stopped: asyncio.Event) -> None:
    """Run one reader until ``stopped`` is set (or its follower fails, which is raised)."""
    from streams.serve.dashboard.view import register_dashboard
    from streams.serve.web import register_views

    follower = ChangelogFollower(settings)
    source = ReplicaSource(settings, follower, upstream)
    host = ReaderHost(source)
    register_views(host, source)
    register_dashboard(host)
    runner = EnvelopeRunner(host.web_app, access_log=None)
    await runner.setup()
    ingress: IngressProducer | None = None
    try:
        await aiohttp_web.TCPSite(runner, settings.web_host, settings.web_port).start()
        source.guard = guard_for(settings, await shared_peer_secret(settings))
        ingress = IngressProducer(settings, tracer_for(settings, f"reader@{settings.web_host}:{settings.web_port}"))
        await ingress.start()
        source.ingress = ingress
        await follower.start()
        print(f"blackroad: reader serving {settings.web_url} (forwards memory search to {upstream})", flush=True)
        while not stopped.is_set():
            source.update_lag_metrics()
            if (failure := follower.failed()) is not None:
                raise failure
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), _METRICS_INTERVAL)
    finally:
        await follower.stop()
        if ingress is not None:
            await ingress.stop()
            if ingress.tracer is not None:
                await ingress.tracer.shutdown()
        await source.close()
        await runner.cleanup()
