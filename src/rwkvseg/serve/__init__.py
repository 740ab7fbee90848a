"""The inference service: `create_app(config)` (FastAPI), `serve(config)` (uvicorn), a web viewer, a load test.

Needs the `serve` extra (fastapi, uvicorn, python-multipart); nothing here is imported by the rest of rwkvseg.
"""

from .app import create_app, serve
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]
