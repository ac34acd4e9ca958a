"""Validation: parity against the PyTorch baseline (now), latency, memory and reports (later issues)."""
