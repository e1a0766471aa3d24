"""One file per route; each exposes ROUTES (aiohttp route definitions) and reads top to bottom."""

from __future__ import annotations

from aiohttp import web

from . import certificates, health, registrations, sas_tokens, signatures

ROUTES: list[web.RouteDef] = [
    *sas_tokens.ROUTES, *signatures.ROUTES, *registrations.ROUTES, *certificates.ROUTES, *health.ROUTES,
]
