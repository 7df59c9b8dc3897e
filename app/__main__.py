"""``python -m fogsplit``: the same command as the ``fogsplit`` console script."""
import sys

from fogsplit.cli import main

sys.exit(main())
