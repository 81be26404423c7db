//! free-roam: watches video streams with vision-language models.
//!
//! Data flows one way: stream ref → source → decoder/sampler → batcher → model backend →
//! store → API. The modules, in that spirit:
//!
//! - [`answers`]: what answers mean beyond text: alert verdicts and state, JSON Schema checks.
//! - [`batch`]: the dynamic batcher shared by the jobs on one model.
//! - [`config`]: typed settings from defaults, a file, `.env` and the environment.
//! - [`devtools`]: `free-roam dev` tools (the ingest benchmark).
//! - [`domain`]: job ids, stream references, fps, prompts, statuses; parsing, no I/O.
//! - [`store`]: jobs, prompt versions and results in SQLite or PostgreSQL (sqlx, migrations).
//! - [`ingest`]: sources: HLS (playlists, fetching, SSRF guard) and Redis streams.
//! - [`media`]: ffmpeg-next decoding of fetched segments; the PTS-based sampler and timeline.
//! - [`retry`]: the backoff policy every network client shares.
//! - [`stats`]: a job's live counters.
//! - [`vlm`]: model backends and their readiness.
//! - [`jobs`]: the job manager, the API's one handle on running work.
//! - [`webhook`]: Standard Webhooks (secrets, signatures, envelope) and the outbox sender.
//! - [`api`]: the REST API, probes, metrics and OpenAPI documents.
//! - [`telemetry`]: logging and the Prometheus recorder.
//! - [`startup`]: `Application`, which wires everything together.

pub mod answers;
pub mod api;
pub mod batch;
pub mod config;
pub mod devtools;
pub mod domain;
pub mod ingest;
pub mod jobs;
pub mod media;
pub mod retry;
pub mod startup;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod vlm;
pub mod webhook;
