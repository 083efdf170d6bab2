"""``python -m gradflow``: the same as the ``gradflow`` script (see :mod:`gradflow.cli`)."""
from gradflow.cli import main

raise SystemExit(main())
