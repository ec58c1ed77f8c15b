"""Harmony chat format: messages, renderer, streaming parser (openai-harmony compatible)."""
