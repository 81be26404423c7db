-- Answers a program can act on: a prompt version's JSON Schema (structured answers), alert
-- rule sets versioned per scope like prompts, each result's alert answers, and each job's
-- alert state (saved with every result, so a resumed job goes on from it).

-- The JSON Schema answers under this version must satisfy, or NULL (free text).
ALTER TABLE prompt_versions ADD COLUMN response_format TEXT;

-- A scope's alert rules as a whole, append-only: [{"name", "question", "min_consecutive"}].
-- Scope 'global' or 'job:<id>', as for prompts; an empty list turns alerts off for the scope.
CREATE TABLE alert_versions (
    scope_key   TEXT NOT NULL,
    version     BIGINT NOT NULL,
    alerts      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (scope_key, version)
);

-- 'json' when output is a JSON value that satisfied the prompt's response_format.
ALTER TABLE results ADD COLUMN output_format TEXT;
-- The frame's alert answers: [{"name", "version", "answer", "raw"?}] or NULL.
ALTER TABLE results ADD COLUMN alerts TEXT;

-- The debounce state of the job's alerts after its newest stored result (answers::alerts).
ALTER TABLE jobs ADD COLUMN alert_state TEXT;
