"""``python -m pobox.storage.privsep MAIN_FD FILES_FD``: the storage helper (:mod:`._helper`)."""

from __future__ import annotations

import sys

from pobox.storage.privsep._helper import main

sys.exit(main())
