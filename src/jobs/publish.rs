//! Results published to a Redis stream (`RESULTS_STREAM`), for consumers that already live on
//! Redis: each stored result is XADDed once stored (`type` `result`, with its `frame_url`),
//! followed by the alert events it fired (`type` `alert.started` / `alert.ended`), with
//! `MAXLEN ~ RESULTS_STREAM_MAXLEN`.
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

use crate::answers::alerts::AlertEvent;
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

    /// XADDs one stored result (with `frame_url` when its frame was kept, `replay_of` as
    /// `<job_id>/<seq>` for a replay's, `captured_at` when the camera said, `pts_end_ms` for a
    /// clip's, `repeats_seq` for a gated one's: each empty otherwise), then the alert events it fired
    /// (each an entry with `type` `alert.started` or `alert.ended` and the event as JSON in
    /// `data`); false when any could not be published (after 3 tries each).
    pub async fn publish(
        &self,
        job_id: &str,
        seq: i64,
        frame: bool,
        r: &NewResult,
        events: &[AlertEvent],
    ) -> bool {
        let frame_url = if frame {
            crate::store::frame_url(job_id, seq)
        } else {
            String::new()
        };
        let seq = seq.to_string();
        let pts = r.pts_ms.to_string();
        let version = r.prompt_version.to_string();
        let (output, format, error) = match &r.output {
            Ok(o) => (o.to_stored(), o.format().unwrap_or("text"), ""),
            Err(e) => (String::new(), "", e.as_str()),
        };
        let alerts = match &r.alerts {
            Some((_, answers)) if !answers.is_empty() => {
                serde_json::to_string(answers).unwrap_or_default()
            }
            _ => String::new(),
        };
        let replay_of = r
            .replay_of
            .as_ref()
            .map(|(job, seq)| format!("{job}/{seq}"))
            .unwrap_or_default();
        let captured_at = r.captured_at.map(|t| t.to_string()).unwrap_or_default();
        let pts_end = r.pts_end_ms.map(|t| t.to_string()).unwrap_or_default();
        let repeats = r.repeats_seq.map(|s| s.to_string()).unwrap_or_default();
        let fields: [(&str, &str); 14] = [
            ("type", "result"),
            ("job_id", job_id),
            ("seq", &seq),
            ("pts_ms", &pts),
            ("prompt_version", &version),
            ("output", &output),
            ("output_format", format),
            ("error", error),
            ("alerts", &alerts),
            ("frame_url", &frame_url),
            ("replay_of", &replay_of),
            ("captured_at", &captured_at),
            ("pts_end_ms", &pts_end),
            ("repeats_seq", &repeats),
        ];
        let mut published = self.add(job_id, &fields).await;
        for event in events {
            let mut data = serde_json::to_value(event).unwrap_or_default();
            data["job_id"] = job_id.into();
            let data = data.to_string();
            let fields = [
                ("type", event.change.event_type()),
                ("job_id", job_id),
                ("data", &data),
            ];
            published &= self.add(job_id, &fields).await;
        }
        published
    }

    /// XADDs one entry with up to 3 tries.
    async fn add(&self, job_id: &str, fields: &[(&str, &str)]) -> bool {
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
                        .arg(fields)
                        .query_async(&mut c)
                        .await
                }
                Err(e) => Err(e),
            };
            match added {
                Ok(_) => return true,
                Err(e) => {
                    tracing::warn!(job_id, error = %e, attempt, "cannot publish to RESULTS_STREAM");
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
        }
        false
    }
}
