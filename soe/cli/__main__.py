"""`python -m soe.cli ...` is the `soe` command."""
import sys

from soe.cli import main

sys.exit(main())
