#!/bin/sh
# One random HMAC key per agent for the compose stack: 64 hex characters, like
# probes/model/signing.py generate_key(). Never committed (see .gitignore).
# The mesh gets every agent's key; each agent only its own (compose.yaml `secrets:`).
set -eu
dir="$(dirname "$0")/secrets"
mkdir -p "$dir"
umask 077
for agent in agent-eu agent-us; do
  [ -s "$dir/$agent.key" ] || od -An -N32 -tx1 /dev/urandom | tr -d " \n" > "$dir/$agent.key"
done
echo "keys in $dir"
