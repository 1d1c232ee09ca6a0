"""Thin adapters that register tip_verl's core functions with verl 0.9.1."""
