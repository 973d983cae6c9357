"""Where the shared imagery lives: the one default data root of the project.

Training, evaluation, ``onboard compile``, the benches and the tests all read the same folder, so
it is defined once here. Kept free of numpy and torch on purpose: a bench, a test fixture or an
argparse default must be able to find the data without pulling in the compiler's stack.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "ONBOARD_DATA"
# parents[2]: models/ -> the repository -> the folder beside it that holds shared/.
BESIDE_REPO = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_data_root() -> Path:
    """``$ONBOARD_DATA``, else the ``shared/data`` folder beside the repository (``../shared/data``
    from its root). Read at each call so a test or a caller can set the variable late."""
    return Path(os.environ.get(ENV, BESIDE_REPO))
