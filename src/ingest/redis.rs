//! The Redis stream source: XREADGROUP with one consumer group per job.
//!
//! An entry holds an encoded image (JPEG, PNG or WebP) in field `frame` and optionally
//! `ts_ms`; without it the entry id's time is used. Entries are acknowledged only after
//! their result is stored or the sampler skipped them ([`Acker`]). If Redis goes away the
//! source reconnects with backoff, shows it in the job's stats, and on each (re)connect reads
//! its pending entries again before new ones, skipping those still in flight. The consumer
//! name is the same for every replica, so whoever runs the job next reads the entries its
//! last owner left pending; the pending list is also re-read every 10 s.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::retry::Backoff;

/// How often a reader goes over its consumer's pending list again while following new entries.
const PENDING_RESCAN: Duration = Duration::from_secs(10);
use crate::stats::Stats;

/// One stream entry handed to the pipeline.
#[derive(Debug)]
pub struct RedisEntry {
    pub id: String,
    pub ts_ms: i64,
    /// The encoded image, or `None` if the entry has no `frame` field.
    pub frame: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct RedisSourceConfig {
    pub server: Url,
    pub key: String,
    pub group: String,
    pub consumer: String,
    pub from_beginning: bool,
    pub block: Duration,
    pub batch: usize,
    pub backoff: Backoff,
}

/// Entries handed on and not yet acknowledged: a re-read of the pending list skips them.
type InFlight = Arc<Mutex<HashSet<String>>>;

pub struct RedisSource {
    config: RedisSourceConfig,
    client: redis::Client,
    in_flight: InFlight,
}

impl RedisSource {
    pub fn new(config: RedisSourceConfig) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(config.server.as_str())?;
        Ok(Self {
            config,
            client,
            in_flight: Arc::default(),
        })
    }

    /// Acknowledges entries on a connection of its own.
    pub fn acker(&self) -> Acker {
        Acker {
            client: self.client.clone(),
            key: self.config.key.clone(),
            group: self.config.group.clone(),
            in_flight: self.in_flight.clone(),
            conn: Arc::new(tokio::sync::Mutex::new(None)),
            backoff: self.config.backoff,
            block: self.config.block,
        }
    }

    async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        // Longer than BLOCK: redis-rs's default response timeout (500 ms) would cut it short.
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(self.config.block + Duration::from_secs(5)));
        let mut conn = self
            .client
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?;
        let start = if self.config.from_beginning { "0" } else { "$" };
        let created: redis::RedisResult<()> = conn
            .xgroup_create_mkstream(&self.config.key, &self.config.group, start)
            .await;
        match created {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        Ok(conn)
    }

    /// Reads until cancelled; reconnects with backoff for as long as Redis is away.
    pub async fn run(
        self,
        tx: mpsc::Sender<RedisEntry>,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) {
        let mut failures = 0u32;
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let conn = tokio::select! {
                _ = cancel.cancelled() => return,
                c = self.connect() => c,
            };
            let error = match conn {
                Ok(mut conn) => {
                    failures = 0;
                    stats.set_source_state("connected");
                    match self.read(&mut conn, &tx, &stats, &cancel).await {
                        Ok(()) => return,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            failures += 1;
            Stats::add(&stats.reconnects, 1);
            stats.set_source_state(format!("reconnecting: {}", redis_error(&error)));
            let wait = self.config.backoff.delay(failures.min(8), None);
            tracing::warn!(error = %error, ?wait, "redis source lost its connection; reconnecting");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Pending entries first (id 0), then new ones (`>`), until cancelled or an error.
    async fn read(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        tx: &mpsc::Sender<RedisEntry>,
        stats: &Stats,
        cancel: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let c = &self.config;
        let mut pending_cursor = Some("0".to_owned());
        let mut scanned = std::time::Instant::now();
        loop {
            // Now and then the pending list again: entries a replica that lost this job read
            // into it (after the hand-over, before it found its lease gone) are answered too.
            if pending_cursor.is_none() && scanned.elapsed() >= PENDING_RESCAN {
                pending_cursor = Some("0".to_owned());
                scanned = std::time::Instant::now();
            }
            let (id, block) = match &pending_cursor {
                Some(cursor) => (cursor.clone(), false),
                None => (">".to_owned(), true),
            };
            let mut opts = StreamReadOptions::default()
                .group(&c.group, &c.consumer)
                .count(c.batch);
            if block {
                opts = opts.block(c.block.as_millis() as usize);
            }
            let keys = [&c.key];
            let ids = [&id];
            let reply: Option<StreamReadReply> = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = conn.xread_options(&keys, &ids, &opts) => r?,
            };
            let entries: Vec<_> = reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect();
            if pending_cursor.is_some() {
                match entries.last() {
                    Some(last) => pending_cursor = Some(last.id.clone()),
                    None => pending_cursor = None,
                }
            }
            for entry in entries {
                if self
                    .in_flight
                    .lock()
                    .map(|s| s.contains(&entry.id))
                    .unwrap_or(false)
                {
                    continue;
                }
                Stats::add(&stats.entries_read, 1);
                let parsed = parse_entry(&entry.id, &entry.map);
                if let Ok(mut s) = self.in_flight.lock() {
                    s.insert(entry.id.clone());
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    sent = tx.send(parsed) => if sent.is_err() { return Ok(()) },
                }
            }
        }
    }
}

fn parse_entry(id: &str, map: &HashMap<String, Value>) -> RedisEntry {
    let frame = match map.get("frame") {
        Some(Value::BulkString(b)) => Some(b.clone()),
        Some(Value::SimpleString(s)) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let ts_ms = map
        .get("ts_ms")
        .and_then(|v| match v {
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.trim().parse::<i64>().ok(),
            Value::Int(i) => Some(*i),
            _ => None,
        })
        .unwrap_or_else(|| id_time_ms(id));
    RedisEntry {
        id: id.to_owned(),
        ts_ms,
        frame,
    }
}

/// The millisecond time in an entry id `<ms>-<seq>`.
pub fn id_time_ms(id: &str) -> i64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

fn redis_error(e: &redis::RedisError) -> String {
    if e.is_connection_refusal() {
        "connection refused".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection lost".to_owned()
    } else {
        e.to_string()
    }
}

/// Acknowledges entries, retrying across reconnects until it succeeds or is cancelled.
#[derive(Clone)]
pub struct Acker {
    client: redis::Client,
    key: String,
    group: String,
    in_flight: InFlight,
    conn: Arc<tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>>,
    backoff: Backoff,
    block: Duration,
}

impl Acker {
    /// XACKs `id`; returns false only if cancelled first (the entry stays pending).
    pub async fn ack(&self, id: &str, cancel: &CancellationToken) -> bool {
        let mut failures = 0u32;
        loop {
            match self.try_ack(id).await {
                Ok(()) => {
                    if let Ok(mut s) = self.in_flight.lock() {
                        s.remove(id);
                    }
                    return true;
                }
                Err(e) => {
                    *self.conn.lock().await = None;
                    failures += 1;
                    let wait = self.backoff.delay(failures.min(8), None);
                    tracing::debug!(error = %e, ?wait, "XACK failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return false,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    async fn try_ack(&self, id: &str) -> redis::RedisResult<()> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let cfg = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(self.block + Duration::from_secs(5)));
            *guard = Some(
                self.client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            );
        }
        let Some(conn) = guard.as_mut() else {
            return Ok(());
        };
        let _: i64 = conn.xack(&self.key, &self.group, &[id]).await?;
        Ok(())
    }

    /// Removes the job's consumer group (the job has ended for good).
    pub async fn destroy_group(&self) {
        if let Ok(mut conn) = self.client.get_multiplexed_async_connection().await {
            let _: redis::RedisResult<i64> = conn.xgroup_destroy(&self.key, &self.group).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_time_comes_from_ts_ms_or_the_id() {
        let mut map = HashMap::new();
        map.insert("frame".to_owned(), Value::BulkString(vec![1, 2, 3]));
        let e = parse_entry("1700000000123-0", &map);
        assert_eq!(e.ts_ms, 1_700_000_000_123);
        assert_eq!(e.frame.as_deref(), Some(&[1u8, 2, 3][..]));
        map.insert("ts_ms".to_owned(), Value::BulkString(b"4500".to_vec()));
        assert_eq!(parse_entry("1-0", &map).ts_ms, 4500);
        assert!(parse_entry("1-0", &HashMap::new()).frame.is_none());
    }
}
