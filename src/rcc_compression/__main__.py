"""``python -m rcc_compression`` runs the ``rcc`` command line."""

from .cli import main

raise SystemExit(main())
