"""resdet.models."""
