-- The frame behind each answer (issue 12), replays of it, and retention.

-- The JPEG the model was asked about, bounded by EVIDENCE_MAX_SIDE, when EVIDENCE=database.
CREATE TABLE evidence (
    job_id      TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    created_at  REAL NOT NULL,
    jpeg        BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- 1 when the result's frame was kept (in the database or EVIDENCE_DIR).
ALTER TABLE results ADD COLUMN evidence BIGINT NOT NULL DEFAULT 0;

-- A replay's result: the job and seq of the result whose frame it asked about again.
ALTER TABLE results ADD COLUMN replay_job TEXT;
ALTER TABLE results ADD COLUMN replay_seq BIGINT;

-- Per-job retention in seconds (NULL: RESULTS_RETENTION / EVIDENCE_RETENTION).
ALTER TABLE jobs ADD COLUMN results_retention_s BIGINT;
ALTER TABLE jobs ADD COLUMN evidence_retention_s BIGINT;
-- Every result (frame) with a seq below this has been removed by retention.
ALTER TABLE jobs ADD COLUMN results_kept_from BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN evidence_kept_from BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_finished ON jobs (completed_at);
