"""resdet.evaluation."""
