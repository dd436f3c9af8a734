"""Serving the champion over HTTP, following the registry.

- `champion`: the model in use, and the thread that follows the `champion` alias and
  swaps a new version in once it has loaded
- `batching`: concurrent requests answered by one forward pass
- `metrics`: counters and the latency histogram, in Prometheus's text format
- `app`: the FastAPI application (/predict, /health, /model, /metrics, the page at /),
  and where the pieces below are wired
- `bodies`: what a /predict body holds (images, JSON), and the answer made of it
- `fast_path`: POST /predict answered before FastAPI's routing (all but multipart)
- `guard`: the API key and the request metrics, in front of everything
- `connections`: slow requests cut, open connections capped
- `server`: uvicorn, in the foreground or as a background service of the stack
"""
