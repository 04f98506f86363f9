"""``python -m fota`` is the ``fota`` command."""

import sys

from fota.app.cli import main

sys.exit(main())
