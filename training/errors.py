"""Mistakes a user can fix (data, options, files, a resume that does not match): the commands report them
as one line, without a traceback (`cli.user_errors`). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


class DataError(UserError, ValueError):
    """The data root, a split, class-name or templates file, or a groups file is not usable."""


class MissingData(UserError, FileNotFoundError):
    """A path the user named (data root, a listed image, a file) does not exist."""
