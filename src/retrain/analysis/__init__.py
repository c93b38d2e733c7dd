"""The end-of-run report: per-class numbers, plots and report.md, built from predictions and the epoch history."""
