"""Helpers for the cluster tests (tests/test_cluster.py)."""
