"""``python -m pymailsrv`` is the same click group as the ``pymailsrv`` script."""

from pymailsrv.cli import main

main()
