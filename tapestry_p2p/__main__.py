"""`python -m tapestry_p2p` is `tapestry`."""

import sys

from tapestry_p2p.app.cli import main

sys.exit(main())
