"""``python -m megatron.validate``: see :mod:`megatron.validate.cli`."""

import sys

from megatron.validate.cli import main

sys.exit(main())
