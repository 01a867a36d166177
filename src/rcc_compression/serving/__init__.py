"""Serving compressed models: an authenticated FastAPI server with dynamic batching and Prometheus metrics."""

from .auth import KeyRecord, KeyStore, generate_key, hash_key
from .inputs import ServeLimits

__all__ = ["KeyRecord", "KeyStore", "ServeLimits", "generate_key", "hash_key"]
