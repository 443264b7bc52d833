"""OpenAI-compatible HTTP API over the agentserve engine: `create_app(async_engine, config,
session_store=None)` (app.py) and uvicorn helpers (server.py)."""


def __getattr__(name: str):  # FastAPI and friends load on first use
    if name == "create_app":
        from agentserve.adapters.openai.app import create_app

        return create_app
    raise AttributeError(name)
