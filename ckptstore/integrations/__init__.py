"""Plugins for training frameworks (imported on demand: each needs its framework)."""
