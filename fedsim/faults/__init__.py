"""Faults of the simulated system: who takes part (participation), and later latency and attacks."""
