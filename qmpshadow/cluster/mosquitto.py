"""A private mosquitto broker for tests, benchmarks and demos.

:class:`Mosquitto` writes a config (one listener, no anonymous clients, a password file
made with ``mosquitto_passwd``, no persistence, a log file), starts ``mosquitto`` (optionally
inside a network namespace, via an argv prefix such as ``ip netns exec NAME``), waits until
its log says it runs and the port accepts, and stops it. It never touches the system's
broker or its configuration.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from qmpshadow.cluster.errors import BrokerError

__all__ = ["Mosquitto", "free_port", "mosquitto_unavailable_reason"]

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = "mosquitto_passwd"


def mosquitto_unavailable_reason() -> str | None:
    """None when a broker can be started here, else why not (never raises)."""
    binary = shutil.which("mosquitto") or (MOSQUITTO if os.path.exists(MOSQUITTO) else None)
    if binary is None:
        return "mosquitto is not installed (Debian: apt-get install mosquitto)"
    if shutil.which(MOSQUITTO_PASSWD) is None:
        return "mosquitto_passwd is not installed (Debian: apt-get install mosquitto)"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One broker process listening on ``host:port`` (see the module docstring).

    ``users`` maps user names to passwords (default: one user ``qmpshadow`` with a random
    password); ``prefix`` runs the broker through another command (a network namespace).
    """

    def __init__(self, directory: str | os.PathLike[str], *, host: str = "127.0.0.1",
                 port: int | None = None, users: dict[str, str] | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.dir = Path(directory)
        self.host = host
        self.port = port if port is not None else free_port(host) if not prefix else 1883
        self.users = users if users is not None else {"qmpshadow": secrets.token_hex(12)}
        self.prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = self.dir / "mosquitto.conf"
        self.passwd = self.dir / "passwd"
        self.log = self.dir / "mosquitto.log"
        self._configured = False

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def username(self) -> str:
        return next(iter(self.users))

    @property
    def password(self) -> str:
        return self.users[self.username]

    def password_file(self) -> Path:
        """A file holding the first user's password (for ``--mqtt-password-file``)."""
        path = self.dir / "client-password"
        path.write_text(self.password + "\n")
        path.chmod(0o600)
        return path

    def _configure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.passwd.unlink()
        for i, (user, password) in enumerate(self.users.items()):
            argv = [MOSQUITTO_PASSWD, "-b", *([] if i else ["-c"]), str(self.passwd), user,
                    password]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if proc.returncode != 0:
                raise BrokerError(f"mosquitto_passwd failed for user {user!r}: "
                                  f"{proc.stderr.strip() or proc.stdout.strip()}")
        self.passwd.chmod(0o600)
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {self.passwd}\n"
            "persistence false\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "log_timestamp_format %Y-%m-%dT%H:%M:%S\n"
            "user root\n")

    def start(self, timeout: float = 15.0) -> None:
        """Configure (first time), start and wait until the broker runs.

        Raises:
            BrokerError: mosquitto exited or did not report running within ``timeout``
                (the message carries its log tail).
        """
        if self.proc is not None and self.proc.poll() is None:
            raise BrokerError(f"broker on {self.url} already runs (pid {self.proc.pid})")
        if not self._configured:
            self._configure()
            self._configured = True
        offset = self.log.stat().st_size if self.log.exists() else 0
        binary = shutil.which("mosquitto") or MOSQUITTO
        self.proc = subprocess.Popen([*self.prefix, binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            text = self.log.read_text(errors="replace")[offset:] if self.log.exists() else ""
            if "Opening ipv4 listen socket" in text and " running" in text:
                break
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with status {self.proc.returncode} while "
                                  f"starting on {self.url}: {err.strip()} {text[-600:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerError(f"mosquitto did not report running on {self.url} within "
                                  f"{timeout}s; log: {text[-600:]}")
            time.sleep(0.02)
        if not self.prefix:
            self._wait_accepting(deadline)

    def _wait_accepting(self, deadline: float) -> None:
        while True:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"broker on {self.url} does not accept connections: "
                                      f"{exc}") from None
                time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stderr is not None:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL the broker (a crash: no clean shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.stop()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
