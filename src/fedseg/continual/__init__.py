"""Continual learning across phases of a federation: EWC and learning without forgetting (#17)."""

#: continual-learning methods (``continual`` config key); ``none`` is naive continued training
METHODS: tuple[str, ...] = ("none", "ewc", "lwf")
