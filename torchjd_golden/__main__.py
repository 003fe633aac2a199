"""``python -m torchjd_golden compare ...``: the same as the ``torchjd-golden`` command."""

from ._cli import main

raise SystemExit(main())
