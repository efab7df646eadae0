"""``python -m balora_plugins.tools.bench`` (the same program as ``balora bench``)."""

import sys

from .run import main

sys.exit(main())
