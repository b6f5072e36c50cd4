#!/usr/bin/env bash
# Certificates for the local stack in compose.yaml: a private CA, and one server certificate
# the edge and the provisioning API both serve for /metrics and the provisioning API.
#   deploy/make-certs.sh            write deploy/tls/{ca.crt,ca.key,server.crt,server.key}
#                                   and, once, dialog.key (the edges' dialog key)
#   deploy/make-certs.sh DIR        write them to DIR instead
# The server certificate names every address the stack reaches it by: the compose service
# names (Prometheus scrapes https://edge:9100), their fixed addresses, and localhost /
# 127.0.0.1 for the ports published on the host. For a local stack only: the key is left
# readable by every user, because the image's user (uid 10911) must read it through the bind
# mount whatever uid made it; production keys come from the organisation's CA with the
# permissions docs/operations.md ("TLS and certificates") describes.
set -euo pipefail

out=${1:-"$(dirname "$0")/tls"}
days=${CERT_DAYS:-825}
names=${CERT_NAMES:-"DNS:edge,DNS:provisioning,DNS:localhost,IP:127.0.0.1,IP:172.30.91.20,IP:172.30.91.21"}

mkdir -p "$out"
cd "$out"
if [ ! -s ca.crt ] || [ ! -s ca.key ]; then
    openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=e911-sip local CA" -keyout ca.key -out ca.crt 2>/dev/null
fi
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=e911-sip local stack" -keyout server.key -out server.csr 2>/dev/null
extensions=$(mktemp)
trap 'rm -f "$extensions" server.csr' EXIT
printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\n' \
    "$names" >"$extensions"
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -out server.crt -extfile "$extensions" 2>/dev/null
if [ ! -s dialog.key ]; then
    # The edges' dialog key ([security] dialog_key_file): made once, shared by every edge.
    head -c 32 /dev/urandom | base64 >dialog.key
fi
chmod 0600 ca.key
chmod 0644 ca.crt server.crt server.key dialog.key
echo "wrote $(pwd)/{ca.crt,ca.key,server.crt,server.key,dialog.key} for ${names}"
