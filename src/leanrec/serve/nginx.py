"""A real nginx run from a folder of its own, in the foreground: what the scale-out test and benchmark start.

``leanrec serve --workers N --nginx-conf FILE`` writes the configuration (see
:func:`~leanrec.serve.routing.nginx_conf`); this runs nginx on it without touching the system's own
nginx: its pid, logs and temporary files stay in the configuration's folder, and under root it runs as
``nobody``, owning only that folder.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
import time
from pathlib import Path


class Nginx:
    """A real nginx from its own folder, on the foreground (``daemon off``), as ``nobody`` under root.

    Args:
        binary: The nginx executable (Debian: ``/usr/sbin/nginx``).
        prefix: Its folder: the configuration's, where it keeps its pid, logs and temporary files.
        conf: The configuration file.

    """

    def __init__(self, binary: str, prefix: Path, conf: Path) -> None:
        self.prefix, self.conf = prefix, conf
        args = [
            binary,
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "error.log"),
            "-g",
            "daemon off;",
        ]
        user: dict = {}
        if os.geteuid() == 0:  # never run the test's nginx as root: as nobody, owning only its folder
            nobody = pwd.getpwnam("nobody")
            for path in [prefix, *prefix.rglob("*")]:
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
        self.out = (prefix / "nginx.out").open("wb")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT, **user)

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        """Wait until nginx accepts connections on ``port``.

        Raises:
            RuntimeError: nginx exited, or did not listen within ``timeout`` (with its log).

        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited ({self.proc.returncode}):\n{self.log()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on {port} in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        """What nginx wrote: its output and its error log."""
        return "".join(
            p.read_text(errors="replace")
            for p in (self.prefix / "nginx.out", self.prefix / "error.log")
            if p.exists()
        )

    def stop(self) -> None:
        """Stop nginx gracefully (SIGQUIT: it finishes the calls in flight), killing it if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the calls in flight
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.out.close()
