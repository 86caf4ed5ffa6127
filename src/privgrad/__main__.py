"""``python -m privgrad``: the command line."""

from privgrad.cli import main

raise SystemExit(main())
