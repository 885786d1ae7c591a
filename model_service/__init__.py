"""A production LLM model service: OpenAI-compatible HTTP and gRPC over one batching engine."""

__version__ = "0.1.0"
