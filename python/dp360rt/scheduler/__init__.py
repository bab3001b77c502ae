"""Noise schedules and DDIM tables."""
