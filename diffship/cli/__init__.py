"""The command line: `diffship` and its sub-commands (typer + rich)."""
