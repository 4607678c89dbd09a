"""The run folder: its files and config, checkpoints and the safe (code-free) state format, the environment facts a
run records."""
