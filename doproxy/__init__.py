"""doproxy: a load-balancing HTTP reverse proxy that scales its own pool."""

from __future__ import annotations

__version__ = "0.1.0"
