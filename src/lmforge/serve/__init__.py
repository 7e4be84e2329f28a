"""Serving: an OpenAI-compatible HTTP server over a continuous-batching engine, and a web playground.

    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=8)).start()
    app = create_app(engine, ServerConfig(served_model_name="gpt2"))   # FastAPI; run with uvicorn

Names load on first use, so importing lmforge.serve (or its config) does not load the web stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Engine": "engine", "EngineConfig": "engine", "EngineRequest": "engine", "SamplingParams": "engine",
    "Output": "engine",
    "QueueFullError": "engine", "EngineStoppedError": "engine", "RequestError": "engine",
    "ServerConfig": "config", "create_app": "app", "run_server": "app",
    "ChatTemplate": "chat", "DEFAULT_CHAT_TEMPLATE": "chat",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmforge.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmforge.serve.{_EXPORTS[name]}"), name)
