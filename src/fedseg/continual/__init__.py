"""Continual learning across phases of a federation: EWC and learning without forgetting (#17)."""
