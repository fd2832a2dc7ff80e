"""``python -m pymailsrv`` and the ``pymailsrv`` script: the click group of cli.py."""

import sys


def run() -> None:
    try:
        from pymailsrv.cli import main
    except KeyboardInterrupt:  # Ctrl-C while the modules load: the words click has for it later
        sys.exit("\nAborted!")
    main()


if __name__ == "__main__":
    run()
