"""Adapters that hand a box to agent frameworks; each is its own module, imported on demand."""
