"""`python -m artifex_ckpt` runs the `artifex-ckpt` command."""

from __future__ import annotations

import sys

from artifex_ckpt.cli import main

sys.exit(main())
