"""tmlx: a JAX training framework for full-duplex multimodal interaction models."""

__version__ = "0.1.0"
