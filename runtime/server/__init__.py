"""moe-serve: an OpenAI-compatible HTTP server over the runtime's continuous-batching engine (FastAPI + uvicorn)."""
