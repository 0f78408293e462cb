"""Lab equipment: checks, benchmarks and experiments about the project. Nothing in the product imports it."""
