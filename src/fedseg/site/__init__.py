"""Site-side training, free of any federation framework."""
