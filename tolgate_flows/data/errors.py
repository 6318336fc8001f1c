"""Exceptions raised by the data loaders."""

from __future__ import annotations


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or holds values outside the expected range.

    The message always names the file (or folder) and what is wrong with it.
    """


class DataNotFoundError(DataError):
    """The files of a dataset are not where they were looked for.

    The message says where to put them and in which format; nothing is ever downloaded.
    """
