"""``python -m dp360rt.export ...``."""
import sys

from .cli import main

sys.exit(main())
