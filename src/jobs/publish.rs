//! Results published to a Redis stream (`RESULTS_STREAM`), for consumers that already live on
//! Redis: each stored result is XADDed once stored, with `MAXLEN ~ RESULTS_STREAM_MAXLEN`.
//!
//! The store stays the record: a result is published after it is stored, and only when it is
//! new (a result repeated after a crash is not published again). Publishing is
//! best-effort with a short retry — a Redis outage must not hold a live pipeline back — and
//! every failure is counted (`results_stream_failures` in a job's stats, and
//! `free_roam_pipeline_results_stream_failures_total` in `/metrics`).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;
use url::Url;

use crate::store::NewResult;

pub struct ResultStream {
    client: redis::Client,
    key: String,
    maxlen: usize,
    conn: OnceCell<ConnectionManager>,
}

impl ResultStream {
    pub fn new(server: &Url, key: String, maxlen: usize) -> Result<Arc<Self>, redis::RedisError> {
        Ok(Arc::new(Self {
            client: redis::Client::open(server.as_str())?,
            key,
            maxlen,
            conn: OnceCell::new(),
        }))
    }

    /// XADDs one stored result; false when it could not be published (after 3 tries).
    pub async fn publish(&self, job_id: &str, seq: i64, r: &NewResult) -> bool {
        let seq = seq.to_string();
        let pts = r.pts_ms.to_string();
        let version = r.prompt_version.to_string();
        let (output, error) = match &r.output {
            Ok(o) => (o.as_str(), ""),
            Err(e) => ("", e.as_str()),
        };
        let fields: [(&str, &str); 6] = [
            ("job_id", job_id),
            ("seq", &seq),
            ("pts_ms", &pts),
            ("prompt_version", &version),
            ("output", output),
            ("error", error),
        ];
        for attempt in 0..3u32 {
            let conn = self
                .conn
                .get_or_try_init(|| ConnectionManager::new(self.client.clone()))
                .await;
            let added: Result<String, redis::RedisError> = match conn {
                Ok(c) => {
                    let mut c = c.clone();
                    redis::cmd("XADD")
                        .arg(&self.key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(self.maxlen)
                        .arg("*")
                        .arg(&fields[..])
                        .query_async(&mut c)
                        .await
                }
                Err(e) => Err(e),
            };
            match added {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, attempt, "cannot publish a result to RESULTS_STREAM");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        false
    }
}
