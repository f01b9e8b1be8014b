"""Pensieve: a local LLM server with continuous batching and conversation memory."""

__version__ = "0.1.0"
