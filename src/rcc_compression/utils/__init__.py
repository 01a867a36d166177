"""Shared utilities: atomic I/O and hashing, seeding, run records, logging."""
