"""Small built-in models, built locally with random weights (no downloads), for the demo."""
