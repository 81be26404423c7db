-- Jobs, prompt versions and results. Times are epoch seconds (REAL), as the seed reports them.
CREATE TABLE jobs (
    list_seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL UNIQUE,
    status          TEXT NOT NULL,
    stream_ref      TEXT NOT NULL,
    source_type     TEXT NOT NULL,
    fps             REAL NOT NULL,
    model           TEXT,
    priority        TEXT NOT NULL,
    from_beginning  BIGINT NOT NULL,
    created_at      REAL NOT NULL,
    started_at      REAL,
    completed_at    REAL,
    frames_processed BIGINT NOT NULL DEFAULT 0,
    results_count   BIGINT NOT NULL DEFAULT 0,
    error           TEXT,
    stats           TEXT NOT NULL DEFAULT '{}',
    progress        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX jobs_status ON jobs (status);

CREATE TABLE prompt_versions (
    scope_key   TEXT NOT NULL,
    version     BIGINT NOT NULL,
    prompt      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (scope_key, version)
);

CREATE TABLE results (
    job_id          TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    pts_ms          BIGINT NOT NULL,
    prompt_scope    TEXT NOT NULL,
    prompt_version  BIGINT NOT NULL,
    model           TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    batch_size      BIGINT NOT NULL,
    latency         TEXT NOT NULL,
    created_at      REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
