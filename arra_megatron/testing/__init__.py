"""Shared fixtures for tests and benchmarks: tiny models, synthetic ARRA batches, process launch."""
