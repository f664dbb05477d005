"""Serving InternLM-XComposer2: an OpenAI-compatible API server (FastAPI + uvicorn) with a
batching engine, and a Gradio web chat.

    engine.Engine       one worker thread owns the model; requests that arrive together decode together
    app.create_app      the HTTP API (/v1/chat/completions, /v1/models, /health, /metrics)
    runner              load a checkpoint, build the server, run uvicorn (foreground or a thread)
    web                 the Gradio chat, on the engine in-process or on a running server
"""
