"""Evaluation: metrics with bootstrap confidence intervals, thresholds chosen on validation, report."""
