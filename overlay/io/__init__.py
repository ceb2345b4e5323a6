"""The shell: everything that touches the kernel, the network or etcd (TAPs, bridges and veths,
the UDP data path, the etcd client, the control socket, the metrics server, the prober,
containers, systemd). Each module executes decisions that ``overlay.core`` makes and stays thin.
"""
