#!/bin/sh
# pod-credentials.sh ROLE NAME HOST...  (the init container `credentials` of every Strata pod)
#
# Every pod has a TLS identity of its own (docs/design/multihost.md §7): this issues it now from the
# cluster CA into /run/strata/credentials, an in-memory emptyDir the pod's container mounts
# read-only: tls.crt and tls.key (0600, this user's), a certificate for ROLE/NAME valid for the
# HOSTs (the addresses it is dialled at), and ca.pem. The CA's key is mounted in this init
# container only; the running component never sees it. (The pod's other Secrets, the cluster key,
# API keys and admin token, are mounted in its container as they are: root:fsGroup 0440 files.)
set -eu
role=$1
name=$2
shift 2
# The directories are the pod's mounts (variables for tests/integration/deploy/).
ca=${STRATA_CA_DIR:-/etc/strata/ca}
out=${STRATA_CREDENTIALS_DIR:-/run/strata/credentials}
work=${STRATA_CA_WORK_DIR:-/run/strata-ca}
umask 077
mkdir -p "$out" "$work"
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
