"""`python -m diffship.cli.main`: the same as the `diffship` command."""

from diffship.cli.main import run

run()
