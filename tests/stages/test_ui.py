"""`stagediff ui`: the MLflow UI binds to 127.0.0.1 unless told otherwise."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from ruamel.yaml import YAML

from helpers import make_config, micro_params, stagediff_env
from stagediff.errors import ConfigError
from stagediff.stages.ui import ui_command


def test_command_binds_loopback_by_default():
    command = ui_command(make_config())
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--backend-store-uri") + 1] == "sqlite:///mlruns/mlflow.db"


@pytest.mark.parametrize("host,port,message", [("my host", 5000, "--host 'my host': expected an IP address"),
                                               ("127.0.0.1", 70000, "--port 70000: expected 1..65535")])
def test_bad_host_or_port_is_refused(host, port, message):
    with pytest.raises(ConfigError, match=message):
        ui_command(make_config(), host, port)


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on `port` (from /proc/net/tcp*, hex little-endian)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_ui_serves_on_loopback_only(tmp_path):

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = tmp_path / "params.yaml"
    with open(params, "w") as f:
        YAML(typ="safe", pure=True).dump(micro_params(), f)
    proc = subprocess.Popen([sys.executable, "-m", "stagediff", "--params", str(params),
                             "ui", "--port", str(port)], cwd=tmp_path, env=stagediff_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status, deadline = None, time.monotonic() + 120
        while status is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
