"""`python -m veil.fl run|superlink|supernode ...`."""

import sys

from veil.fl.cli import main

sys.exit(main())
