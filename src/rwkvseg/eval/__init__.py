"""Evaluation: metrics (functional core) and reports."""
