"""``python -m peekcore``: the command line (see ``peekcore.cli``)."""

from .cli import main

raise SystemExit(main())
