"""Baselines the relay is measured against."""
