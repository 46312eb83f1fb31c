"""`palm serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over a batching engine that
decodes concurrent requests together (`engine`), with the batched model steps in `batched`, the
API's shapes in `schemas`, the routes in `app` and the command in `cli`."""
