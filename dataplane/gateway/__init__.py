"""OpenAI-compatible HTTP gateway: one endpoint for every deployment."""
