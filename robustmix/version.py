"""robustmix's version, recorded in every run folder, checkpoint manifest and evaluation report (equal to the one in
pyproject.toml)."""

__version__ = "0.1.0"
