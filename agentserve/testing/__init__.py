"""Test helpers: tiny local Hugging Face model directories (see tiny.py)."""

from agentserve.testing.tiny import ARCHS, NAMED_SHAPES, TOOL_CALL_FORMAT, make_tiny_model, tiny_model_cached

__all__ = ["ARCHS", "NAMED_SHAPES", "TOOL_CALL_FORMAT", "make_tiny_model", "tiny_model_cached"]
