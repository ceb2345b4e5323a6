"""The two kinds of failure the `overlay` command reports as one line, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad flag, bad value): exit status 2."""


class RunError(Exception):
    """Something failed at run time (a device, a socket, etcd, a missing agent): exit status 1."""
