"""`python -m nemoh ...` is the `nemoh` command."""
from nemoh.cli import main

raise SystemExit(main())
