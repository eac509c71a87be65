#!/bin/sh
# pod-credentials.sh ROLE NAME HOST...  (the init container `credentials` of every Strata pod)
#
# Strata reads each credential from a regular 0600 file of its own user (a key on a command line,
# or in a file others can read, is refused: docs/design/security.md §9). A Secret volume's files are
# root's and reached through symlinks, so they are copied here into /run/strata/credentials, an
# in-memory emptyDir the pod's container mounts read-only:
#   - every file of /etc/strata/secrets (this pod's Secrets: the cluster key, API keys, admin token);
#   - tls.crt and tls.key: a certificate for ROLE/NAME, valid for the HOSTs (what peers dial),
#     issued now from the cluster CA, and ca.pem. The CA's key is mounted in this init container
#     only; the running component never sees it (docs/design/multihost.md §7).
set -eu
role=$1
name=$2
shift 2
# The directories are the pod's mounts (variables for the test, tests/unit/deploy/).
secrets=${STRATA_SECRETS_DIR:-/etc/strata/secrets}
ca=${STRATA_CA_DIR:-/etc/strata/ca}
out=${STRATA_CREDENTIALS_DIR:-/run/strata/credentials}
work=${STRATA_CA_WORK_DIR:-/run/strata-ca}
umask 077
mkdir -p "$out" "$work"
for f in "$secrets"/*; do
  [ -f "$f" ] && cat "$f" > "$out/$(basename "$f")"
done
cat "$ca/ca.pem" > "$work/ca.pem"
cat "$ca/ca-key.pem" > "$work/ca-key.pem"
hosts=
for host in "$@"; do hosts="$hosts --host $host"; done
# $hosts unquoted on purpose: IP addresses and DNS names, split into "--host H" pairs.
strata certs issue --dir "$work" --role "$role" --name "$name" $hosts --out "$work/issued"
for f in "$work"/issued/*-key.pem; do mv "$f" "$out/tls.key"; done
for f in "$work"/issued/*.pem; do mv "$f" "$out/tls.crt"; done
cat "$work/ca.pem" > "$out/ca.pem"
rm -rf "$work"
echo "credentials of $role/$name in $out: $(ls "$out" | tr '\n' ' ')"
