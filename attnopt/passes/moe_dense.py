"""Dense-routed experts (placeholder)."""
RULES: list = []
