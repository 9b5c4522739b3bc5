"""cdabench: a benchmark suite for large-scale dataset distillation (CDA, SRe2L)."""

__version__ = "0.1.0"
