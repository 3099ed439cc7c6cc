"""doproxy: a load-balancing HTTP reverse proxy that scales its own pool."""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os

if _os.environ.get("DOPROXY_PURE_PYTHON"):
    from doproxy._compiled import use_source as _use_source

    _use_source()
