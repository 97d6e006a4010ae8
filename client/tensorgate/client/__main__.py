"""`python -m tensorgate.client` runs the `tensorgate` command."""

from tensorgate.client.cli import main

raise SystemExit(main())
