#!/bin/sh
# Submit the app to the compose SuperLink (TLS, trusting the federation's CA) and stream its log.
set -eu
. /app/docker/connection.sh
exec flwr run /app docker --stream --run-config /app/docker/run-config.toml
