"""resdet.data."""
