"""``python -m servescope``: the command line (as the ``servescope`` script)."""

from .cli import main

main()
