"""Runnable examples: ``python -m convgrad.examples.digits``."""
