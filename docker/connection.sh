#!/bin/sh
# The compose SuperLink as the `flwr` CLI's default connection: TLS, trusting the federation's CA.
# Sourced by register.sh and submit.sh.
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "docker"

[superlink.docker]
address = "${SUPERLINK_ADDRESS:-superlink:9091}"
root-certificates = "/certs/ca.crt"
TOML
