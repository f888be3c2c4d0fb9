"""``kvoffload serve``: an OpenAI-compatible HTTP server over one engine loop (needs the
``serve`` extra: FastAPI, uvicorn, prometheus-client)."""
