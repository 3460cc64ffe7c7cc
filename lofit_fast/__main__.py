"""`python -m lofit_fast ...` is the `lofit-fast` command."""
import sys

from .cli import main

sys.exit(main())
