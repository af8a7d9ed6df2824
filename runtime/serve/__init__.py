"""`tinygptv-edge serve`: an OpenAI-compatible HTTP server over the Pipeline (the `serve` extra).

    HTTP (Starlette on uvicorn) --app.py--> request models (schema.py) --Engine (engine.py)-->
        one worker thread: messages -> Chat (history replayed, KV prefix reused) -> Turn -> pieces
        --> SSE chunks / one JSON answer

Only this package imports the ASGI stack and llguidance; the rest of runtime/ does not (import-linter).
"""
