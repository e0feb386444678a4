#!/usr/bin/env bash
# Runs avsync against the local PostgreSQL and RabbitMQ: one ingress on :8080 and two workers,
# with a generated secret, until Ctrl-C. Tenant databases are created on first use.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -p avsync-ingress -p avsync-worker
SECRET="whsec_$(head -c 32 /dev/urandom | base64)"
export AVSYNC_TOPOLOGY="${AVSYNC_TOPOLOGY:-avsync}" AVSYNC_CREATE_TENANT_DATABASES=true
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
AVSYNC_HMAC_SECRETS="$SECRET" AVSYNC_LISTEN=127.0.0.1:8080 AVSYNC_METRICS_LISTEN=127.0.0.1:9090 \
  target/release/avsync-ingress & pids+=($!)
AVSYNC_METRICS_LISTEN=127.0.0.1:9091 target/release/avsync-worker & pids+=($!)
AVSYNC_METRICS_LISTEN=127.0.0.1:9092 target/release/avsync-worker & pids+=($!)
echo "ingress: POST http://127.0.0.1:8080/webhooks/authvital (metrics :9090, workers :9091 :9092)"
echo "secret:  $SECRET   (sign requests as shown in README.md, 'Sign a test request by hand')"
wait
