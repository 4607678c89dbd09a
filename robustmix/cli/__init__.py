"""The command-line layer the recipes share: argparse types (``args``), presets (``presets``), optimizer and lr
schedule (``optim``), flag values from files (``config``), and the shared flags and fit path (``recipe``)."""
