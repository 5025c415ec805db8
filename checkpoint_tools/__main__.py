"""``python -m checkpoint_tools --help``."""

from checkpoint_tools.cli import main

raise SystemExit(main())
