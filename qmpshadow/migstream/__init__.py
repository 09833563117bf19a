"""migstream."""
