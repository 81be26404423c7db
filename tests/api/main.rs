//! Black-box tests: the service started on port 0, talked to over HTTP, on SQLite and on
//! PostgreSQL. One test binary (every file under tests/ would link the crate again).

mod fixtures;
mod helpers;

mod alerts;
mod cameras;
mod dashboard;
mod deploy;
mod errors;
mod evidence;
mod files;
mod frames;
mod gating;
mod health;
mod jobs;
mod lifecycle;
#[cfg(feature = "candle")]
mod model;
mod pipeline_hls;
mod pipeline_redis;
mod prompts;
mod protection;
mod push;
#[cfg(feature = "candle")]
mod reference;
mod replicas;
mod webhooks;
