"""``python -m molkern ...`` = the ``molkern`` command (see molkern.cli)."""

from .cli import main

main()
