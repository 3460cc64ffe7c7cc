"""`python -m lofit_fast.cli ...` is the `lofit-fast` command (what `torchrun -m` and `accelerate launch -m` need)."""
import sys

from . import main

sys.exit(main())
