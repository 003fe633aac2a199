"""``python -m torchjd_golden compare ...``: the same as the ``torchjd-golden`` command."""

from .compare import main

raise SystemExit(main())
