"""Measured and estimated figures: evaluation (accuracy, size, latency) and what-if estimates."""
