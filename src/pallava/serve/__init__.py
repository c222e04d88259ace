"""The doors to a trained assistant.

`app` (OpenAI-compatible HTTP API: `create_app`, `ServerSettings`, `run_server`, `BackgroundServer`),
`server` (HTTP limits on slow clients and bodies, uvicorn in a thread), `engine` (batched generation behind
the API; `continuous` its running batch, `jobs` what it is handed, `decode_threads` its CPU threads),
`protocol` (request models, errors), `images` (safe image URLs), `chat` (terminal chat), `predict`
(resumable JSONL batch prediction), `ui` (Gradio web page with the connector's heat map). Import the
submodule you need; this package imports nothing heavy.
"""
