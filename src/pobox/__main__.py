"""``python -m pobox``: the same as the ``pobox`` command."""

from __future__ import annotations

import sys

from pobox.cli import main

sys.exit(main())
