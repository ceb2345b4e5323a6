"""Real container engines in lab hosts: one Docker engine (dockerd, Debian's docker.io 20.10) per
lab host, and rootful Podman 4 (Debian's 4.3, CNI backend) with storage of its own, for the tests
and the demo (DESIGN.md, lab conventions). Images are built locally from busybox-static with
``docker import`` / ``podman import``: no registry is ever asked::

    with Lab("eng", hosts=2) as lab:
        d1 = start_dockerd(lab, 1, workdir / "h1")
        try:
            import_busybox_image(d1)
            d1.docker("run", "-d", "--network", "none", "--name", "c1", IMAGE, "sleep", "600")
        finally:
            d1.stop()

How dockerd is started, and why:

- ``nsenter --net=/run/netns/<host>``, not ``ip netns exec``: the latter remounts /sys for the
  namespace, and /sys/fs/cgroup (which dockerd and runc need) goes with it.
- Its own ``--data-root``, ``--exec-root`` (containerd's socket, the containers' netns files),
  ``--pidfile``, ``-H unix://<workdir>/docker.sock`` and ``--config-file`` (an empty daemon.json,
  so /etc/docker/daemon.json is never read). dockerd starts a containerd of its own under the
  exec root (none runs system-wide here), so nothing is shared between hosts.
- No host networking of its own: ``--bridge=none --iptables=false --ip6tables=false
  --ip-forward=false --ip-masq=false --userland-proxy=false``, and ``--default-address-pool``
  inside 198.18.240.0/20, so a network Docker makes by itself (``docker_gwbridge`` when a driver
  gives no gateway) still takes a lab address.
- ``--storage-driver=overlay2`` (the data root is on ext4 here), ``--exec-opt
  native.cgroupdriver=cgroupfs`` (no systemd), ``--cgroup-parent=/<host namespace>`` (removed on
  stop).
- Plugins: dockerd looks for ``NAME.sock`` in /run/docker/plugins and ``NAME.spec`` /
  ``NAME.json`` in /etc/docker/plugins and /usr/lib/docker/plugins, paths compiled in. With
  ``private_plugins=True`` (the default) dockerd runs in a mount namespace of its own
  (``unshare --mount --propagation slave``) in which ``<workdir>/plugins`` is bind-mounted on
  /run/docker/plugins and ``<workdir>/etc-docker`` on /etc/docker: each host's plugin can then
  have the same name (``<workdir>/plugins/NAME.sock``), and each dockerd its own key.json.
  With ``private_plugins=False`` every dockerd shares /run/docker/plugins, so each host's plugin
  needs a name of its own there. Either way a network driver cannot be called ``overlay``:
  Docker's built-in (swarm) overlay driver wins and answers "This node is not a swarm manager".

Everything is stopped by PID and removed by ``stop()``, also after a crash: dockerd, its
containerd and shims (by the workdir in their command lines), container processes left in the
cgroup parent (they are in network namespaces of their own, so ``Lab.down`` does not find
them), mounts left under the workdir, the cgroup parent, the workdir; and, when the last engine
of its kind stops, what the engines made outside (/run/docker, podman's /var/lib/containers).

Podman (``start_podman``) has no daemon: each ``cli`` call runs ``nsenter --net=... podman
--root ... --runroot ...`` with CONTAINERS_CONF / CONTAINERS_STORAGE_CONF pointing at files in
its workdir (CNI backend, its own network_config_dir and cni_plugin_dirs, cgroupfs, file locks,
ulimits the sandbox allows).
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overlay.lab.netns import Lab, wait_for

IMAGE = "overlay-lab/busybox:1"  # the local image; podman names it localhost/overlay-lab/busybox:1
PODMAN_IMAGE = f"localhost/{IMAGE}"
BUSYBOX = "/bin/busybox"  # Debian's busybox-static
APPLETS = ("sh", "ping", "nc", "ip", "sleep", "wget", "httpd", "true", "cat", "ls", "echo", "hostname", "nslookup")
DEFAULT_POOL = "base=198.18.240.0/20,size=24"  # lab addresses only, apart from underlay and overlays
INSTALL = "apt-get install --no-install-recommends docker.io busybox-static podman"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class EngineError(RuntimeError):
    """An engine could not be started or a command of it failed; the message says why."""


def dockerd_available() -> bool:
    """Whether Debian's docker.io (dockerd, containerd, runc) and busybox-static are installed."""
    return all(shutil.which(b) for b in ("dockerd", "containerd", "runc", "nsenter")) and os.path.exists(BUSYBOX)


def podman_available() -> bool:
    return all(shutil.which(b) for b in ("podman", "conmon", "nsenter")) and os.path.exists(BUSYBOX)


def docker_cli() -> str:
    """docker.io's own client (/usr/bin/docker) before any other docker on PATH."""
    if os.path.exists("/usr/bin/docker"):
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if found is None:
        raise EngineError(f"no docker client: {INSTALL}")
    return found


# --- the image --------------------------------------------------------------------------------


def busybox_rootfs_tar(path: Path) -> Path:
    """A tarball of a minimal root file system: /bin/busybox (static) and its applets as
    symlinks, /etc/passwd and /etc/group, empty /proc /sys /dev /tmp. Returns ``path``."""
    if not os.path.exists(BUSYBOX):
        raise EngineError(f"{BUSYBOX} missing: apt-get install busybox-static")

    def entry(name: str, kind: bytes = tarfile.DIRTYPE, mode: int = 0o755, **kw: Any) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, 0
        for k, v in kw.items():
            setattr(info, k, v)
        return info

    with tarfile.open(path, "w") as tar:
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "var", "var/www"):
            tar.addfile(entry(d, mode=0o1777 if d == "tmp" else 0o755))
        with open(BUSYBOX, "rb") as f:
            tar.addfile(entry("bin/busybox", tarfile.REGTYPE, size=os.path.getsize(BUSYBOX)), f)
        for applet in APPLETS:
            tar.addfile(entry(f"bin/{applet}", tarfile.SYMTYPE, mode=0o777, linkname="busybox"))
        for name, text in (("etc/passwd", "root:x:0:0:root:/:/bin/sh\n"), ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = entry(name, tarfile.REGTYPE, mode=0o644, size=len(data))
            tar.addfile(info, _bytes(data))
    return path


def _bytes(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def import_busybox_image(engine: Dockerd | Podman, tag: str = IMAGE) -> str:
    """``docker import`` (or ``podman import``) of busybox_rootfs_tar as ``tag``, CMD /bin/sh.
    Returns the image's id. No registry is involved."""
    with tempfile.TemporaryDirectory(prefix="overlay-img-") as tmp:
        tar = busybox_rootfs_tar(Path(tmp) / "rootfs.tar")
        result = engine.cli("import", "--change", 'CMD ["/bin/sh"]', str(tar), tag, timeout=60)
    return result.stdout.strip().splitlines()[-1]


# --- processes and mounts, by PID and by path ---------------------------------------------------


def _pids_with(marker: str, programs: tuple[str, ...] = ("containerd",)) -> list[int]:
    """PIDs of ``programs`` (their executable's name starts with one: containerd and its shims)
    whose command line contains ``marker`` (a workdir path unique to one engine). Only those:
    an agent given a path under the workdir (its plugin directory) is not the engine's."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(argv[0]).decode(errors="replace") if argv else ""
        if marker.encode() in b"\0".join(argv) and name.startswith(programs):
            found.append(int(entry))
    return [p for p in found if p != os.getpid()]


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _unmount_under(path: Path) -> None:
    """Lazily unmount whatever is still mounted at or below ``path`` (deepest first)."""
    prefix = str(path).rstrip("/")
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _cgroup_pids(name: str) -> list[int]:
    """Every process in cgroup ``name`` or below it, in any v1 hierarchy or in v2."""
    pids: set[int] = set()
    for top in glob.glob("/sys/fs/cgroup/*/") + ["/sys/fs/cgroup/"]:
        for dirpath, _, files in os.walk(os.path.join(top, name.strip("/"))):
            if "cgroup.procs" in files:
                try:
                    pids |= {int(p) for p in Path(dirpath, "cgroup.procs").read_text().split()}
                except OSError:
                    pass
    return sorted(pids)


def _remove_cgroup(name: str) -> None:
    """Kill what is left in cgroup ``name`` (containers whose dockerd and shim died: they are in
    network namespaces of their own, so Lab.down does not find them), then rmdir it in every v1
    hierarchy and in v2 (children first)."""
    left = _cgroup_pids(name)
    _kill(left)
    for pid in left:
        wait_for(lambda pid=pid: _gone(pid), 5, f"process {pid} to exit")
    for top in glob.glob("/sys/fs/cgroup/*/") + ["/sys/fs/cgroup/"]:
        root = os.path.join(top, name.strip("/"))
        if not os.path.isdir(root):
            continue
        for dirpath, _, _ in sorted(os.walk(root), key=lambda t: len(t[0]), reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass


class _Shared:
    """Directories outside the workdirs that engines of one kind make (dockerd: /run/docker;
    podman: /var/lib/containers), removed when the last engine of that kind this process
    started stops: never while another one may use them (removing a directory that is a mount
    point in another dockerd's mount namespace would take that mount away)."""

    def __init__(self, paths: tuple[str, ...], tree: bool) -> None:
        self.paths, self.tree = paths, tree
        self.made: set[str] = set()
        self.live: set[int] = set()

    def note(self) -> None:
        """Before an engine starts: remember which of the paths do not exist yet."""
        self.made |= {p for p in self.paths if not os.path.lexists(p)}

    def started(self, engine: object) -> None:
        self.live.add(id(engine))

    def stopped(self, engine: object) -> None:
        self.live.discard(id(engine))
        if not self.live:
            _remove_made(sorted(self.made), self.tree)
            self.made.clear()


def _remove_made(paths: list[str], tree: bool = False) -> None:
    """Remove what engines made outside their workdirs: files, empty directories (rmdir,
    deepest first), or with ``tree`` whole directories (podman's blob-info cache)."""
    for path in sorted(paths, key=len, reverse=True):
        if tree:
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isfile(path):
            os.unlink(path)
        else:
            try:
                os.rmdir(path)
            except OSError:  # not empty: another dockerd or a plugin uses it
                pass


# dockerd makes /run/docker/plugins (and start_dockerd makes it as a mount point; empty
# directories only are removed) and, with private_plugins=False, its trust key /etc/docker/key.json
DOCKER_SHARED = _Shared(("/run/docker", "/run/docker/plugins", "/etc/docker/key.json"), tree=False)
# podman import (c/image) keeps a blob-info cache in /var/lib/containers/cache whatever --root says
# and libcni its cache of results in /var/lib/cni (entries go with each container's DEL)
PODMAN_SHARED = _Shared(("/var/lib/containers", "/var/lib/cni"), tree=True)


# --- dockerd --------------------------------------------------------------------------------------


@dataclass
class Dockerd:
    """One dockerd in a lab host. ``socket`` is its API (``docker -H unix://<socket>``);
    ``plugins`` the directory it sees as /run/docker/plugins (None: the shared one)."""

    lab: Lab
    host: int
    workdir: Path
    proc: subprocess.Popen[Any]
    plugins: Path | None
    cgroup_parent: str
    stopped: bool = field(default=False)

    @property
    def socket(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def host_url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.workdir / "dockerd.log"

    def plugin_socket(self, name: str) -> Path:
        """Where a plugin called ``name`` puts its socket for this dockerd to find it."""
        return (self.plugins or Path("/run/docker/plugins")) / f"{name}.sock"

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``docker -H unix://<socket> args...`` (from the root namespace: the API socket is
        a file, reachable from anywhere)."""
        argv = [docker_cli(), "-H", self.host_url, *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise EngineError(f"docker {' '.join(args)} on host {self.host}: {result.stderr.strip()}")
        return result

    docker = cli

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Remove every container (docker rm -f), stop dockerd (SIGTERM, then SIGKILL), kill what
        is left of its containerd and shims by PID, unmount and delete the workdir, remove the
        cgroup parent. Idempotent; safe after a crash."""
        if self.stopped:
            return
        self.stopped = True
        marker = str(self.workdir)
        try:
            if self.running():
                ids = self.cli("ps", "-aq", timeout=20, check=False).stdout.split()
                if ids:
                    self.cli("rm", "-f", *ids, timeout=60, check=False)
        except (subprocess.TimeoutExpired, EngineError):
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        leftovers = _pids_with(marker)  # containerd, containerd-shim-runc-v2 (by their -address)
        _kill(leftovers)
        for pid in leftovers:
            wait_for(lambda pid=pid: _gone(pid), 5, f"process {pid} to exit")
        _unmount_under(self.workdir)
        _remove_cgroup(self.cgroup_parent)
        shutil.rmtree(self.workdir, ignore_errors=True)
        DOCKER_SHARED.stopped(self)


def dockerd_argv(workdir: Path, cgroup_parent: str) -> list[str]:
    """dockerd's command line for a lab host (see the module's docstring)."""
    return [
        "dockerd",
        "--config-file", str(workdir / "daemon.json"),
        "--data-root", str(workdir / "data"),
        "--exec-root", str(workdir / "exec"),
        "--pidfile", str(workdir / "docker.pid"),
        "-H", f"unix://{workdir / 'docker.sock'}",
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--userland-proxy=false",
        "--default-address-pool", DEFAULT_POOL,
        "--storage-driver=overlay2",
        "--exec-opt", "native.cgroupdriver=cgroupfs",
        "--cgroup-parent", cgroup_parent,
    ]  # fmt: skip


def start_dockerd(
    lab: Lab, host: int, workdir: Path, *, private_plugins: bool = True, timeout: float = START_TIMEOUT
) -> Dockerd:
    """Start dockerd in lab host ``host`` with everything of its own under ``workdir`` (made
    here; must not exist or be empty) and wait until its API answers. ``private_plugins``: see
    the module's docstring. EngineError (with the end of dockerd's log) if it does not come up."""
    if not dockerd_available():
        raise EngineError(f"dockerd, containerd, runc or busybox missing: {INSTALL}")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise EngineError(f"{workdir} is not empty: each dockerd needs a fresh workdir")
    DOCKER_SHARED.note()
    (workdir / "daemon.json").write_text("{}\n")
    cgroup_parent = f"/{lab.ns(host)}"
    argv = dockerd_argv(workdir, cgroup_parent)
    plugins = None
    if private_plugins:
        plugins, etc = workdir / "plugins", workdir / "etc-docker"
        plugins.mkdir(mode=0o700)
        etc.mkdir(mode=0o755)
        for shared in ("/run/docker/plugins", "/etc/docker"):
            os.makedirs(shared, exist_ok=True)  # mount points; dockerd and docker.io make them too
        script = f'mount --bind "{plugins}" /run/docker/plugins && mount --bind "{etc}" /etc/docker && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script, "sh", *argv]
    log = open(workdir / "dockerd.log", "w")
    proc = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{lab.ns(host)}", *argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    log.close()
    lab.procs.append(proc)  # lab.down() kills it too, should stop() be missed
    d = Dockerd(lab, host, workdir, proc, plugins, cgroup_parent)
    DOCKER_SHARED.started(d)
    try:
        wait_for(
            lambda: (
                proc.poll() is not None
                or d.cli("version", "-f", "{{.Server.Version}}", timeout=10, check=False).returncode == 0
            ),
            timeout,
            f"dockerd on host {host}",
            interval=0.1,
        )
        if proc.poll() is not None:
            raise EngineError(f"dockerd on host {host} exited ({proc.returncode}): {_tail(d.log)}")
    except BaseException as e:
        tail = _tail(d.log)
        d.stop()
        if isinstance(e, TimeoutError):
            raise EngineError(f"{e}: {tail}") from None
        raise
    return d


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- podman ---------------------------------------------------------------------------------------

CONTAINERS_CONF = """\
[containers]
# podman raises RLIMIT_NOFILE/NPROC to 1048576 by default; where the hard limit is lower and
# CAP_SYS_RESOURCE is missing, runc fails with "error setting rlimit type 7: operation not permitted"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
cni_plugin_dirs = [{plugin_dirs}]
network_config_dir = "{workdir}/net.d"
default_subnet = "198.18.250.0/24"
default_subnet_pools = [{{"base" = "198.18.240.0/20", "size" = 24}}]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{workdir}/events.log"
tmp_dir = "{workdir}/tmp"
static_dir = "{workdir}/root/libpod"
volume_path = "{workdir}/root/volumes"
runtime = "runc"
# file locks under tmp_dir instead of the one /dev/shm/libpod_lock every podman shares
lock_type = "file"
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{workdir}/root"
runroot = "{workdir}/run"
"""


@dataclass
class Podman:
    """Rootful podman run in a lab host with its own storage, config and CNI network dir
    (``net_d``: put NAME.conflist there for ``--network NAME``)."""

    lab: Lab
    host: int
    workdir: Path
    stopped: bool = field(default=False)

    @property
    def net_d(self) -> Path:
        return self.workdir / "net.d"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.workdir / "storage.conf"),
        }

    def argv(self, *args: str) -> list[str]:
        return [
            "nsenter", f"--net=/run/netns/{self.lab.ns(self.host)}",
            "podman", "--root", str(self.workdir / "root"), "--runroot", str(self.workdir / "run"),
            *args,
        ]  # fmt: skip

    def cli(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise EngineError(f"podman {' '.join(args)} on host {self.host}: {result.stderr.strip()}")
        return result

    podman = cli

    def stop(self) -> None:
        """Remove every container (``rm -a -f -t 0``: plain ``rm -f`` waits 10 s for SIGTERM),
        kill leftover conmons by PID, unmount and delete the workdir. Idempotent."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.cli("rm", "-a", "-f", "-t", "0", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        _kill(_pids_with(str(self.workdir), ("conmon", "podman")))  # conmon, by its -b/--exit-dir under the workdir
        _unmount_under(self.workdir)
        if not _cgroup_pids("libpod_parent"):  # podman's default parent, shared by every podman
            _remove_cgroup("/libpod_parent")
        shutil.rmtree(self.workdir, ignore_errors=True)
        PODMAN_SHARED.stopped(self)


def start_podman(lab: Lab, host: int, workdir: Path, cni_plugin_dirs: list[str] | None = None) -> Podman:
    """Podman for lab host ``host``: containers.conf (CNI backend, its own net.d, file locks,
    cgroupfs) and storage.conf under ``workdir``. Podman has no daemon: ``cli`` runs it in the
    host's network namespace each time. ``cni_plugin_dirs`` are searched before /usr/lib/cni."""
    if not podman_available():
        raise EngineError(f"podman, conmon or busybox missing: {INSTALL}")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for d in ("net.d", "tmp", "root", "run"):
        (workdir / d).mkdir(exist_ok=True)
    PODMAN_SHARED.note()
    dirs = ", ".join(f'"{d}"' for d in [*(cni_plugin_dirs or []), "/usr/lib/cni"])
    (workdir / "containers.conf").write_text(CONTAINERS_CONF.format(workdir=workdir, plugin_dirs=dirs))
    (workdir / "storage.conf").write_text(STORAGE_CONF.format(workdir=workdir))
    p = Podman(lab, host, workdir)
    PODMAN_SHARED.started(p)
    backend = p.cli("info", "--format", "{{.Host.NetworkBackend}}", timeout=30).stdout.strip()
    if backend != "cni":
        p.stop()
        raise EngineError(f"podman on host {host} uses network backend {backend!r}, not cni")
    return p


def container_netns(pid: int) -> str:
    """The network namespace of a process, as ``net:[inode]``."""
    return os.readlink(f"/proc/{pid}/ns/net")


def namespace_inode(ns: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
