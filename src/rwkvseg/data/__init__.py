"""Dataset readers, splits, transforms and preprocessing."""


class MissingExtraError(ImportError):
    """A reader or writer needs an optional extra that is not installed; the message names the `pip install` to run.

    The command line reports it as a one-line error, like a bad input."""
