"""``python -m sensitivity_lora.cli ...``: the same as ``sensitivity-lora`` (and ``python -m sensitivity_lora``)."""
import sys

from . import main

sys.exit(main())
