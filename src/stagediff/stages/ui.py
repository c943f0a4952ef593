"""`stagediff ui`: the MLflow UI on this project's tracking store.

Binds to 127.0.0.1 unless told otherwise: the runs hold the organism's backdoor
strings and completions, which should not be served to the network by accident.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys

from stagediff.config import Config
from stagediff.errors import ConfigError

LOOPBACK = "127.0.0.1"


def ui_command(cfg: Config, host: str = LOOPBACK, port: int = 5000) -> list[str]:
    """The `mlflow ui` command line for the project's store (validated host and port)."""
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"--host {host!r}: expected an IP address such as {LOOPBACK}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected 1..65535")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", cfg.tracking.tracking_uri,
            "--host", host, "--port", str(port)]


def run(cfg: Config, host: str = LOOPBACK, port: int = 5000) -> int:
    """Run the UI in the foreground until interrupted; its exit status is the command's."""
    command = ui_command(cfg, host, port)
    if host not in (LOOPBACK, "localhost", "::1"):
        print(f"warning: serving on {host}, reachable from other machines", file=sys.stderr)
    print(f"MLflow UI for {cfg.tracking.tracking_uri} at http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        return subprocess.run(command).returncode
    except KeyboardInterrupt:
        return 0
