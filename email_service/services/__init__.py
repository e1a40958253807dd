"""Service functions: what a request does, between the HTTP handlers and the models."""
