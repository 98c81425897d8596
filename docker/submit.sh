#!/bin/sh
# Register the compose SuperLink as a Flower connection (TLS, trusting the federation's CA), then submit the app
# and stream its log.
set -eu
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "docker"

[superlink.docker]
address = "${SUPERLINK_ADDRESS:-superlink:9091}"
root-certificates = "/certs/ca.crt"
TOML
exec flwr run /app docker --stream --run-config /app/docker/run-config.toml
