"""The configuration in force, published through one reference.

Intake, the dispatcher, the WebSocket hub, the admin API and the health checks all hold the same
``Current`` and read ``current.routes`` when they need it; a reload builds a new index and swaps
it here, whole, in one assignment. Nobody keeps a copy that could go stale.
"""

from __future__ import annotations

from router.routing import Routes


class Current:
    def __init__(self, routes: Routes) -> None:
        self.routes = routes
