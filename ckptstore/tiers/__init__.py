"""Tiers behind one seam: what a save does for a store with tiers, the background replication to the shared tier and its per-tier state."""
