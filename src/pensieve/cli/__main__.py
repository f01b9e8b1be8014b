"""`python -m pensieve.cli ...`, the same as the `pensieve` command."""

import sys

from pensieve.cli.main import main

sys.exit(main())
