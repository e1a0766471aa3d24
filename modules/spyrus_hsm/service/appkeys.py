"""Typed keys for what the aiohttp application carries."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from .core import Service
from .pacing import Pacer

SERVICE = web.AppKey("spyrus.service", Service)
# On the health listener: why the API cannot serve yet (None: it can). /readyz is false until then.
API_NOT_SERVING: web.AppKey[Callable[[], str | None]] = web.AppKey("spyrus.api_not_serving")
# The requests started per event-loop iteration (see pacing).
PACER = web.AppKey("spyrus.pacer", Pacer)
