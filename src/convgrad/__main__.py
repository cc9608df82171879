"""``python -m convgrad`` is the ``convgrad`` command."""

from .cli import main

raise SystemExit(main())
