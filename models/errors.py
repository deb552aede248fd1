"""The one error type for a user's mistake (config, data, checkpoint, layout).

It lives at the bottom layer so that models/, parallel/ and pretrain/ all raise the same
class; ``pretrain.errors`` re-exports it, and the CLI prints ``error: <message>`` and exits 2.
"""


class UserError(ValueError):
    """Bad input. The message is one line naming the key (or file) and what is allowed."""


