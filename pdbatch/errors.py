"""Error kinds. A UserError ends the job with exit code 2 and one line; a row's problem is
recorded in that row's `error` column and never stops the other rows."""


class UserError(Exception):
    """Bad path, bad column, bad option, not a model: the user can fix it. Exit code 2."""


class IncompatibleKV(ValueError):
    """A KV packet that the decode side cannot use (other model, dtype or shape)."""
