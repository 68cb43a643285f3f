"""Study arms (centralized, local-only, federated) and their reports."""
