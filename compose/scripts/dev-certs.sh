#!/usr/bin/env bash
# A development certificate authority and a broker certificate signed by it, with openssl.
#
#   scripts/dev-certs.sh [-o CERTS_DIR] [-k CA_DIR] [-d DAYS] NAME...
#
# NAME: every DNS name and IP address clients reach the broker at. They go into the
# certificate's subjectAltName, which clients check (Python's ssl, paho, mosquitto_sub and
# mosquitto bridges all verify the host name). Default: broker localhost 127.0.0.1.
#
# Writes, with EC P-256 keys:
#   CERTS_DIR/ca.crt       the CA certificate: copy it to every client (devices: /etc/fogsplit/ca.crt)
#   CERTS_DIR/server.crt   the broker's certificate
#   CERTS_DIR/server.key   the broker's key (mode 0600)
#   CA_DIR/ca.key          the CA's key. It is NOT mounted into the broker; keep it off the
#                          broker host once the certificates are made.
# CERTS_DIR defaults to compose/certs (mounted at /mosquitto/certs), CA_DIR to compose/ca.
# Run again to re-issue the broker certificate (new names, expiry): an existing CA is kept, so
# clients go on trusting it. For production, use your organisation's CA instead.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
certs=$here/certs
ca=$here/ca
days=825

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while getopts "o:k:d:h" opt; do
  case $opt in
    o) certs=$OPTARG ;;
    k) ca=$OPTARG ;;
    d) days=$OPTARG ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] || set -- broker localhost 127.0.0.1
command -v openssl >/dev/null || { echo "dev-certs.sh: openssl not found (apt-get install openssl)" >&2; exit 1; }

san=""
for name in "$@"; do
  if [[ $name =~ ^[0-9]+(\.[0-9]+){3}$ || $name == *:* ]]; then kind=IP; else kind=DNS; fi
  san="${san:+$san,}$kind:$name"
done

umask 077
mkdir -p "$certs" "$ca"

if [ ! -s "$ca/ca.key" ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$ca/ca.key"
  openssl req -x509 -new -sha256 -days 3650 -key "$ca/ca.key" -subj "/CN=fogsplit development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$ca/ca.crt"
  echo "new CA: $ca/ca.crt (key $ca/ca.key)"
fi

openssl ecparam -name prime256v1 -genkey -noout -out "$certs/server.key"
openssl req -new -sha256 -key "$certs/server.key" -subj "/CN=$1" -out "$ca/server.csr"
openssl x509 -req -sha256 -days "$days" -in "$ca/server.csr" \
  -CA "$ca/ca.crt" -CAkey "$ca/ca.key" -CAcreateserial -out "$certs/server.crt" \
  -extfile <(printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
                           "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth")
rm -f "$ca/server.csr"
cp "$ca/ca.crt" "$certs/ca.crt"
chmod 0644 "$certs/ca.crt" "$certs/server.crt"
chmod 0600 "$certs/server.key"
echo "broker certificate for $san: $certs/server.crt (key $certs/server.key, CA $certs/ca.crt)"
