"""Generation, metrics and evaluation."""
