"""Serving over HTTP: the continuous-batching scheduler, the thread that owns the model
(scheduler.py), and the FastAPI app with its errors, auth, metrics and draining (server.py).

May import t5kit.model, data and inference.
"""
