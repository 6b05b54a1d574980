"""`python -m dpo_jax.cli ...`: the `dpo-jax` console script."""

import sys

from dpo_jax.cli import console_main

sys.exit(console_main())
