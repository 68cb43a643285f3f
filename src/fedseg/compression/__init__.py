"""Compressed site updates: stochastic quantisation and top-k with error feedback (#17)."""
