"""Reusable test helpers: the Store conformance suite and a real multi-process rank runner."""
