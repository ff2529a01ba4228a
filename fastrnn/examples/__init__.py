"""Runnable examples: `python -m fastrnn.examples.digits`."""
