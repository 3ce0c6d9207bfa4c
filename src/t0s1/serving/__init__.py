"""Serving: an OpenAI-compatible server with budget forcing (``t0s1 serve``) and ``t0s1 chat``."""

from t0s1.serving.batcher import Batcher
from t0s1.serving.server import create_app

__all__ = ["Batcher", "create_app"]
