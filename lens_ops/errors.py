"""The one error type the engine raises for bad input.

Every message is a full sentence a user can act on; the command line prints it alone (no traceback)
and ComfyUI shows it in the node's error panel.
"""


class LensError(ValueError):
    """Bad input or an operation that cannot be done; the message says what and where."""
