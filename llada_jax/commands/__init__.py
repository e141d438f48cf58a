"""One module per `llada-jax` subcommand, each with `add_arguments(parser)` and `run(args)`:
argparse, printing and exit codes live here and in `cli.py` only."""
