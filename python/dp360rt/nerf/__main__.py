"""``python -m dp360rt.nerf fit|render|video|mesh|scene ...`` (the same verbs as ``dp360rt nerf``)."""
import sys

from .cli import main

sys.exit(main())
