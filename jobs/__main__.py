"""``python -m jobs ...`` is ``cdam ...`` (handy for ``ray job submit -- python -m jobs explain ...``)."""

import sys

from jobs.cli import main

sys.exit(main())
