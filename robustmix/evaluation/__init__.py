"""Robust evaluation: the attack registry, the per-example worst case and its sanity flags, run-folder evaluation,
reports and statistics."""
