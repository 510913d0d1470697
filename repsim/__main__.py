"""``python -m repsim``: the ``repsim`` command line."""

from repsim.cli import main

raise SystemExit(main())
