"""Evaluation: metrics, prediction over a split, and the run report."""
