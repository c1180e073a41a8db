"""NVIDIA GPU checks."""
