"""Serving: an OpenAI-compatible HTTP server (app.py) over a continuous-batching engine (engine.py),
with per-request LoRA adapters and soft prompts (adapters.py) and a chat page (chat.html)."""
