"""lilota's tests. Run them with ``python -m unittest discover -s tests`` from the repository root.

The test modules import their helpers as top-level modules (``from support import ...``), as
discovery with ``-s tests`` finds them; this puts tests/ on the path for the other ways in
(``python -m unittest tests.test_api``), so that the helpers are one module either way."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
