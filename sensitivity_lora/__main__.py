"""``python -m sensitivity_lora ...`` (and ``torchrun ... -m sensitivity_lora ...``): the ``sensitivity-lora`` command."""
import sys

from .cli import main

sys.exit(main())
