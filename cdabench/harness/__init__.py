"""The harness: one way to run any suite (run.py), whatever its kind (suites.py: cross-arch,
continual), its cells here or in worker processes (workers.py), resumed from its records."""
