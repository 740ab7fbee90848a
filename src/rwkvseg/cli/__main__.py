"""`python -m rwkvseg.cli`: the `rwkvseg` command (also what `torchrun -m rwkvseg.cli train ...` starts)."""

import sys

from . import main

sys.exit(main())
