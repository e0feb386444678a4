#!/usr/bin/env bash
# Runs avsync against the local PostgreSQL and RabbitMQ: one ingress on :8080 and two workers,
# with a generated secret, until Ctrl-C. Tenant databases are created on first use.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -p avsync-ingress -p avsync-worker
SECRET="whsec_$(head -c 32 /dev/urandom | base64)"
export AVSYNC_TOPOLOGY="${AVSYNC_TOPOLOGY:-avsync}" AVSYNC_CREATE_TENANT_DATABASES=true
ROWS="rows:    one database per tenant, tenant_<id>: psql -h 127.0.0.1 -U postgres -d tenant_acme -c 'SELECT id, email, tenant_id FROM av_identities'"
pids=()
# Ctrl-C reaches the processes as well; each stops gracefully and exits 0, and then so does this
# script. Whatever way it ends, it leaves nothing running.
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM EXIT
AVSYNC_HMAC_SECRETS="$SECRET" AVSYNC_LISTEN=127.0.0.1:8080 AVSYNC_METRICS_LISTEN=127.0.0.1:9090 \
  target/release/avsync-ingress & pids+=($!)
AVSYNC_METRICS_LISTEN=127.0.0.1:9091 target/release/avsync-worker & pids+=($!)
AVSYNC_METRICS_LISTEN=127.0.0.1:9092 target/release/avsync-worker & pids+=($!)
echo "ingress: POST http://127.0.0.1:8080/webhooks/authvital (metrics :9090, workers :9091 :9092)"
echo "secret:  $SECRET   (sign requests as shown in README.md, 'Sign a test request by hand')"
echo "$ROWS"
status=0
for pid in "${pids[@]}"; do
  while true; do
    rc=0; wait "$pid" || rc=$?
    # A trapped signal interrupts `wait` (status above 128) while the process is still stopping.
    if [ "$rc" -gt 128 ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    [ "$rc" -eq 0 ] || status=$rc
    break
  done
done
echo "stopped (exit status $status)"
echo "$ROWS"
exit "$status"
