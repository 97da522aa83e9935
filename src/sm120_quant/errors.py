"""The exceptions the CLI's one error boundary turns into exit codes.

Library code raises these; only `sm120_quant.cli` decides how they are printed and which exit code they get.
"""


class UserError(Exception):
    """Unusable input (a recipe, a path, a flag, a checkpoint that is not one): exit code 2.

    The message is one line that names the file, the key or tensor, and the fix.
    """


class CheckFailed(Exception):
    """The job ran and found problems (lint findings, a verification threshold crossed): exit code 1."""
