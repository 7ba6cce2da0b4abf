"""Helpers shared by pobox's tests and benchmarks (real external servers, fixtures)."""
