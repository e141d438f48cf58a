"""The user-error base class, here so that data_pipeline (which never imports llada_jax) can use it.

`llada_jax.errors` re-exports it with the other subclasses; `llada-jax` (cli.main) catches it
once and prints the message with exit code 2. A subclass of ValueError, so callers that already
catch ValueError keep working.
"""


class UserError(ValueError):
    """Input the user must fix (a file, a flag, a config value); the message says what to do."""


class DataError(UserError):
    """A data file, record, tokenizer or dataset directory that cannot be used as given."""


class OutputError(UserError):
    """An output path that cannot be written: a read-only or missing place, the wrong kind."""
