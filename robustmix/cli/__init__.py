"""The command-line layer the recipes share: argparse types, presets, optimizer and scheduler, the fit path."""
