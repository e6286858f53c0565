"""Serving over HTTP: the continuous-batching scheduler, the thread that owns the model
(scheduler.py), the requests it advances row by row (requests.py), and the FastAPI app with its
errors, auth, metrics and draining (server.py).

May import t5kit.model, data and inference.
"""
