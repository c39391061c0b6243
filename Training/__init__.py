"""Headless training and evaluation built on BrainLesionSAMLib (networks, transforms, losses and
metrics are imported from the library, never re-defined here)."""
