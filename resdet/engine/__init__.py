"""resdet.engine."""
