"""Fault injection through the real CLI: what survives a mistake or a crash (README, reliability table)."""
