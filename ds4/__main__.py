"""`python -m ds4`: the `ds4` command where its console script is not on PATH."""
from .cli import main

main(prog_name="ds4")
