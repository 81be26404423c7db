-- p50/p95/p99 per phase over the job's newest 1000 results, kept by its pipeline so that
-- status reads them with the job instead of scanning results.
ALTER TABLE jobs ADD COLUMN latency TEXT NOT NULL DEFAULT '{}';
