-- Push: a job's own webhook, the durable log of job events (`GET /api/v1/events`) and the
-- webhook outbox, written in the same transaction as the result or status change it carries.

-- {"url", "secret" (whsec_...), "events": [...]} or NULL; never shown by the API.
ALTER TABLE jobs ADD COLUMN webhook TEXT;

CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      TEXT NOT NULL,
    type        TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

-- One row per message per endpoint. `id` orders a job's messages; `msg_id` is the
-- webhook-id header, the same on every attempt. `endpoint` is 'job' (the job's own webhook)
-- or 'global' (WEBHOOK_URL). state: pending, delivered, dead (gave up after
-- WEBHOOK_MAX_AGE_SECS), cancelled (the endpoint answered 410 Gone).
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id          TEXT NOT NULL UNIQUE,
    job_id          TEXT NOT NULL,
    endpoint        TEXT NOT NULL,
    url             TEXT NOT NULL,
    type            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        BIGINT NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    queued_at       REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    locked_until    REAL,
    locked_by       TEXT,
    last_attempt_at REAL,
    last_status     BIGINT,
    last_error      TEXT,
    delivered_at    REAL
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_order ON webhook_deliveries (job_id, endpoint, state, id);

-- Endpoints that answered 410 Gone: nothing more is queued for or sent to them.
CREATE TABLE webhook_gone (
    url     TEXT PRIMARY KEY,
    at      REAL NOT NULL
);
