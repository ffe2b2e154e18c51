"""Serves the dashboard's files: ``GET /dashboard`` (the page), its script and its style.

The files are read once, when the views are registered (at app build), from this package's
data. The page itself needs no token: it holds no data. Its script asks the data views,
which check the token as they always do (the script sends the one in ``#token=...``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from streams.serve.web import ApiView

#: The page's own files and their content types (nothing else is served under /dashboard/).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
#: Only the worker's own files and views: no inline script, no other origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def read_assets() -> dict[str, bytes]:
    """The dashboard's files, by name, from the package data."""
    package = resources.files(__package__)
    return {name: package.joinpath(name).read_bytes() for name in ASSETS}


def register_dashboard(app: Any) -> None:
    """Hook the dashboard's views into ``app`` (its files read now, once)."""
    assets = read_assets()

    def serve(view: ApiView, name: str) -> Any:
        headers = {
            "Content-Type": ASSETS[name],
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        }
        return view.bytes(assets[name], headers=headers)

    @app.page("/dashboard")
    class Dashboard(ApiView):
        """The page (open to all: the figures come from the views its script asks)."""

        name = "dashboard"
        reads_tables = False
        open_to_all = True

        async def get(self, request: Any) -> Any:
            return serve(self, "index.html")

    def asset_view(file: str) -> None:
        @app.page(f"/dashboard/{file}")
        class DashboardAsset(ApiView):
            name = "dashboard"
            reads_tables = False
            open_to_all = True

            async def get(self, request: Any) -> Any:
                return serve(self, file)

    for file in ASSETS:
        if file != "index.html":
            asset_view(file)
