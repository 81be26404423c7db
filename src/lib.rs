//! free-roam: watches video streams with vision-language models.
//!
//! Data flows one way: stream ref → source → decoder/sampler → batcher → model backend →
//! store → API. The modules, in that spirit:
//!
//! - [`config`]: typed settings from defaults, a file, `.env` and the environment.
//! - [`domain`]: job ids, stream references, fps, prompts, statuses; parsing, no I/O.
//! - [`store`]: jobs, prompt versions and results in SQLite or PostgreSQL (sqlx, migrations).
//! - [`vlm`]: model backends and their readiness.
//! - [`jobs`]: the job manager, the API's one handle on running work.
//! - [`api`]: the REST API, probes, metrics and OpenAPI documents.
//! - [`telemetry`]: logging and the Prometheus recorder.
//! - [`startup`]: `Application`, which wires everything together.

pub mod api;
pub mod config;
pub mod domain;
pub mod jobs;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod vlm;
