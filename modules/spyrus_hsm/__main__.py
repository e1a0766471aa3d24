"""`python -m spyrus_hsm` is the `spyrus-hsm` command."""

from .cli import run

run()
