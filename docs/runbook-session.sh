#!/usr/bin/env bash
# The runbook's commands, run in order on this machine (loopback): docs/runbook.md shows what each printed. Output also in /tmp/rb-transcript.txt
set -u
cd "$(dirname "$0")/.."
export PATH=$PWD/.venv/bin:$PATH FLWR_HOME=/tmp/rb/flwr-home
rm -rf /tmp/rb; mkdir -p /tmp/rb
run() { echo "\$ $*"; "$@" 2>&1; echo "[exit $?]"; echo; }
T="--set preprocess.image_size=32 --set train.batch_size=8 --set federation.local_epochs=1 --set augment.enabled=false"
{
run fedxray data synth --out /tmp/rb/data --hospitals 4 --patients 40 --size 64
mv /tmp/rb/data/hospital_4 /tmp/rb/st-anne     # the fourth hospital joins by hand below
run fedxray data check /tmp/rb/st-anne
run fedxray certs --out /tmp/rb/coord-certs --host coordinator.example.org   # across sites: the SuperLink's certificate
run fedxray federation up --data /tmp/rb/data --workdir /tmp/rb/fed
# hospital st-anne: its own key pair; only the .pub goes to the coordinator
run fedxray certs --no-tls --hospital st-anne --out /tmp/rb/st-anne-keys
printf '[disclosure]\nmin-count = 10\n' > /tmp/rb/st-anne-policy.toml
# coordinator: registers the hospital's public key
FLWR_HOME=/tmp/rb/fed/cli run flwr supernode register /tmp/rb/st-anne-keys/nodes/st-anne.pub fedxray-local
PORT=$(python -c "import json;print(json.load(open('/tmp/rb/fed/federation-state.json'))['port'])")
echo "\$ flower-supernode --root-certificates /tmp/rb/fed/certs/ca.crt --auth-supernode-private-key /tmp/rb/st-anne-keys/nodes/st-anne --superlink 127.0.0.1:$PORT --port 9196 --node-config \"data-path='/tmp/rb/st-anne' site='st-anne' site-policy='/tmp/rb/st-anne-policy.toml'\" &"
FLWR_HOME=/tmp/rb/st-anne-home flower-supernode --root-certificates /tmp/rb/fed/certs/ca.crt \
  --auth-supernode-private-key /tmp/rb/st-anne-keys/nodes/st-anne --superlink 127.0.0.1:$PORT --port 9196 \
  --node-config "data-path='/tmp/rb/st-anne' site='st-anne' site-policy='/tmp/rb/st-anne-policy.toml'" \
  > /tmp/rb/st-anne-node.log 2>&1 &
echo $! > /tmp/rb/st-anne.pid
sleep 12
run fedxray federation status --workdir /tmp/rb/fed
run fedxray federation stats --workdir /tmp/rb/fed --profile demo --set federation.min_available_nodes=4 $T
run fedxray federation run --workdir /tmp/rb/fed --profile demo --rounds 2 --set federation.min_available_nodes=4 --set federation.min_train_nodes=4 $T
run fedxray evaluate --workdir /tmp/rb/fed --bundle /tmp/rb/fed/results/train/bundle --profile demo --set federation.min_available_nodes=4 $T
echo '$ fedxray federation logs --workdir /tmp/rb/fed superexec-hospital_1 -n 400 | grep "first training step"'
fedxray federation logs --workdir /tmp/rb/fed superexec-hospital_1 -n 400 | grep "first training step"; echo
run fedxray federation rotate-key --workdir /tmp/rb/fed hospital_2
run fedxray federation status --workdir /tmp/rb/fed
run fedxray train --profile demo --data /tmp/rb/st-anne --out /tmp/rb/gpu --set train.device=cuda
run fedxray federation down --workdir /tmp/rb/fed
echo "\$ kill \$(cat /tmp/rb/st-anne.pid)   # the hospital stops its own node"
kill $(cat /tmp/rb/st-anne.pid); sleep 3
run fedxray federation status --workdir /tmp/rb/fed
} | tee /tmp/rb-transcript.txt
