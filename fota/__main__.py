"""``python -m fota`` is the ``fota`` command."""

import sys

from fota.cli import main

sys.exit(main())
