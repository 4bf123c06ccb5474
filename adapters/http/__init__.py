"""The HTTP apps: the webhook receiver and the admin API (aiohttp), with their OpenAPI document and metrics."""
