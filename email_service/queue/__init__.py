"""Background jobs on RQ: queue names, the Redis connection and the worker entry point."""
