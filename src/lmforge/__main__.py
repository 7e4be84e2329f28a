"""`python -m lmforge ...` (and `torchrun -m lmforge ...`) run the CLI."""

from lmforge.cli import main

raise SystemExit(main())
