"""Console entry points: ``overlay`` (cli; the operator commands in admin) and ``overlay-cni`` (cni)."""
