"""Data-pruning filters: difficulty scoring and the other filters behind the same interface."""
