"""``python -m sensitivity_lora.cli ...``: the same as the ``sensitivity-lora`` command."""
import sys

from . import main

sys.exit(main())
