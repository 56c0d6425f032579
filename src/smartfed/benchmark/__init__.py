"""The benchmark: the composition runner (gates and controls), ``smartfed compare`` / ``report``
over run folders, the paper's claims from run records, and timing helpers for ``benchmarks/``."""
