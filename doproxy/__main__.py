from __future__ import annotations

from doproxy.cli import main

main()
