"""Face embedding service: ONNX Runtime inference, durable HNSW gallery, FastAPI HTTP API."""

__version__ = "0.1.0"
