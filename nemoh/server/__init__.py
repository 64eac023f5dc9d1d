"""The OpenAI-compatible HTTP server: `build_app(engine, ServerSettings(...), chat_template)`, run by `nemoh serve`.

app.py (routes, lifespan) · middleware.py (key, sizes, drain) · protocol.py (request/response models) ·
serving_chat.py / serving_completions.py (one job per endpoint) · serving_base.py (what they share) ·
generation.py (engine requests per choice, reasoning budget, aborts) · streaming.py (SSE, disconnects) ·
errors.py (OpenAI error shape) · metrics.py (Prometheus) · runner.py (uvicorn, 431, SIGTERM drain) ·
settings.py (flags and shared state).
"""
from nemoh.server.app import build_app
from nemoh.server.settings import ServerSettings

__all__ = ["ServerSettings", "build_app"]
