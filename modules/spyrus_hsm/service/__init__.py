"""The HTTP signing service for leaf devices (aiohttp): authentication, policy, routes,
problem+json, OpenAPI, token cache, rate limits and audit."""
