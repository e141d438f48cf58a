import sys

from llada_jax.cli import main

sys.exit(main())
