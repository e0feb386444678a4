-- When a reconcile last applied a snapshot of each tenant, so that of many workers running the
-- schedule (AVSYNC_RECONCILE_INTERVAL) only one asks AuthVital about a tenant per interval.
CREATE TABLE IF NOT EXISTS avsync_reconcile_runs (
    tenant_id   text PRIMARY KEY,
    applied_at  timestamptz NOT NULL
);
