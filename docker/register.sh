#!/bin/sh
# Register each named hospital's public key on the compose SuperLink (Flower's SuperNode authentication):
# only registered keys may connect. A key the SuperLink already knows (a restart) is fine.
set -eu
. /app/docker/connection.sh
for site in "$@"; do
  for try in 1 2 3 4 5 6 7 8 9 10; do
    if out=$(flwr supernode register "/certs/nodes/$site.pub" docker 2>&1); then echo "$out"; break; fi
    case "$out" in *"already in use"*) echo "$site: already registered"; break ;; esac
    [ "$try" = 10 ] && { echo "$out" >&2; exit 1; }
    sleep 3    # the SuperLink may still be starting
  done
done
