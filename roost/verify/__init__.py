"""Checking recorded runs against Roost's delivery promises (shared by verify and the simulator)."""
