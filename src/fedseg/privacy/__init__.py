"""Privacy: differential privacy, the per-site epsilon ledger, membership inference."""
