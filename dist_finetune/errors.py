"""The one family of errors a user can cause (config, data, weights, run folder, launch, device).

Every command turns a `UserError` into one line on stderr and exit code 2 (`cli.run_command`); anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message names the file, row or key and the fix."""

    exit_code = 2
