"""Small shared utilities (atomic I/O, device choice, seeding)."""
