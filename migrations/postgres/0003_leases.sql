-- Replicas: a job is run by the replica holding its lease. `owner` is that replica's id,
-- `lease_expires_at` when another may take the job over, `lease_token` a fencing token that
-- grows at every claim; every write a pipeline makes is conditional on owner and token.
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN lease_expires_at DOUBLE PRECISION;
ALTER TABLE jobs ADD COLUMN lease_token BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_owner ON jobs (owner);

-- Exactly-once results: the position in the source a result answers (an HLS frame's pts, a
-- Redis entry id). Work repeated after a crash or a takeover finds its key taken. Rows from
-- before this migration have none (NULLs never collide).
ALTER TABLE results ADD COLUMN source_key TEXT;
CREATE UNIQUE INDEX results_source_key ON results (job_id, source_key);
