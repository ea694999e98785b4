"""``python -m captum_gim``: the ``captum-gim`` command line (see :mod:`captum_gim.cli`)."""

from captum_gim.cli import main

raise SystemExit(main())
