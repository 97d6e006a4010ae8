"""Without the `observability` extra the server still serves: tracing and metrics asked for are off, and it says so."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np

from tensorgate.client import Client
from tests.support.serving import EXAMPLE_MODELS

# What an environment without OpenTelemetry and prometheus_client looks like to `import`.
PROGRAM = """
import sys
for name in ("opentelemetry", "prometheus_client"):
    sys.modules[name] = None
from tensorgate.server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_server_serves_without_opentelemetry_and_prometheus_client() -> None:
    command = [
        sys.executable,
        "-c",
        PROGRAM,
        "--address",
        "127.0.0.1:0",
        "--repository",
        str(EXAMPLE_MODELS),
        "--tracing",
        "--metrics-address",
        "127.0.0.1:0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        banner: list[str] = []
        for line in process.stdout:
            banner.append(line.strip())
            if line.strip().startswith("metrics are off"):
                break
        address = banner[0].rsplit(" ", 1)[1]
        with Client(address) as client:
            outputs = client.predict("digits", {"image": np.zeros((1, 1, 8, 8), np.float32)})
        assert set(outputs) == {"probabilities", "label"}
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    hint = "(pip install 'tensorgate[observability]')"
    assert f"tracing is off: opentelemetry is not installed {hint}" in banner
    assert f"metrics are off: prometheus_client is not installed {hint}" in banner
    # The same, once each, as a warning in the log.
    assert stderr.count("tracing is off: opentelemetry is not installed") == 1
    assert stderr.count("metrics are off: prometheus_client is not installed") == 1
