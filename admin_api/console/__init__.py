"""The account console under ``/console/`` (issue 15, SPEC §5.6): the seed's Skype Manager pages.

Served by the control API's own Litestar app (:func:`router`), signed in with sessions rather
than bearer keys, so :func:`mount` sends ``/console`` requests past the
:class:`~admin_api.auth.Gate` straight to the app; everything else still goes through the Gate.
Every action is a request to the JSON API as the session's principal (``apicall.py``).
See docs/console.md.
"""

from __future__ import annotations

from typing import Any

from litestar.types import ASGIApp, Receive, Scope, Send

from .pages import router

__all__ = ["mount", "router"]


def mount(app: Any, gate: Any) -> ASGIApp:
    """The entry point: ``/console`` and below to ``app`` (the console's routes), the rest to ``gate``.

    :param app: the control API's Litestar app (with :func:`router` among its handlers).
    :param gate: the :class:`~admin_api.auth.Gate` in front of it (the console signs keys in with it).
    """
    app.state.console_gate = gate

    async def entry(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/console" or path.startswith("/console/"):
            await app(scope, receive, send)
        else:
            await gate(scope, receive, send)

    return entry
