"""Typed keys for what the aiohttp application carries."""

from __future__ import annotations

from aiohttp import web

from .core import Service

SERVICE = web.AppKey("spyrus.service", Service)
