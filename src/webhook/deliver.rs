//! The webhook sender: sends what the store's outbox holds, at least once, in order per job
//! and endpoint.
//!
//! Every replica runs one. It wakes when the store says a job changed (a result or status
//! here, or on PostgreSQL on any replica) and at least once a second, asks the store for the
//! first pending message of each job and endpoint whose turn has come, and drains each such
//! queue in its own task (at most `WEBHOOK_CONCURRENCY` at once): take the message (a short
//! lock in the row, so two replicas do not send it at once), sign it, POST it, record the
//! answer. A 2xx delivers it; 410 Gone stops everything for that endpoint; anything else
//! (an error, a timeout, another status) is tried again after a capped, jittered backoff or
//! the endpoint's `Retry-After`, until the message is older than `WEBHOOK_MAX_AGE_SECS`,
//! when it is dead: listed by the API and sent again on request. Redirects are not followed
//! and the SSRF guard applies to every address connected to. Secrets are never logged.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{EventKind, Secret};
use crate::domain::redacted_url;
use crate::ingest::ssrf::{refusal, GuardedResolver, NetworkPolicy};
use crate::retry::{retry_after, Backoff};
use crate::store::{now_secs, Delivery, EndpointKind, Store};

/// WEBHOOK_URL with its secret.
#[derive(Debug, Clone)]
pub struct GlobalEndpoint {
    pub url: String,
    pub secret: Secret,
    pub events: Vec<EventKind>,
}

/// How webhooks are sent (WEBHOOK_* settings).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub global: Option<GlobalEndpoint>,
    /// A message not delivered this long after it was queued is dead.
    pub max_age: Duration,
    /// Longest wait between two attempts (a Retry-After is honoured up to `max_age`).
    pub max_backoff: Duration,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// Job queues sent to at once.
    pub concurrency: usize,
}

/// Answers read from an endpoint are cut at this length for `last_error`.
const ERROR_BODY_CHARS: usize = 200;

type Key = (String, EndpointKind);

pub struct Deliverer {
    store: Store,
    client: reqwest::Client,
    policy: Arc<NetworkPolicy>,
    settings: WebhookSettings,
    owner: Arc<str>,
    backoff: Backoff,
    /// Queues a task is draining here.
    active: Mutex<HashSet<Key>>,
    slots: Arc<Semaphore>,
    /// A drained queue asks for a new look at once (something may have come in meanwhile).
    kick: Notify,
}

impl Deliverer {
    pub fn new(
        store: Store,
        settings: WebhookSettings,
        policy: NetworkPolicy,
        owner: Arc<str>,
    ) -> Result<Arc<Self>, reqwest::Error> {
        let policy = Arc::new(policy);
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .user_agent(concat!(
                "free-roam/",
                env!("CARGO_PKG_VERSION"),
                " (webhooks)"
            ))
            .build()?;
        Ok(Arc::new(Self {
            store,
            client,
            policy,
            backoff: Backoff::new(Duration::from_secs(1), settings.max_backoff, u32::MAX),
            slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
            settings,
            owner,
            active: Mutex::new(HashSet::new()),
            kick: Notify::new(),
        }))
    }

    /// Sends until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut changes = me.store.changes();
            let mut look = true;
            // Not reset by wake-ups: retries that come due and other replicas' messages are
            // found within a second however busy the changes are.
            let mut floor = tokio::time::interval(Duration::from_secs(1));
            floor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                if look {
                    me.scan().await;
                }
                look = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = changes.recv() => {
                        // Several changes at once are one look, and only if a message was
                        // queued here (other replicas' are found by the one-second look).
                        while changes.try_recv().is_ok() {}
                        me.store.take_outbox_hint()
                    }
                    _ = me.kick.notified() => true,
                    _ = floor.tick() => true,
                };
            }
        });
    }

    /// Starts a task for every queue whose first message is due and not drained here already.
    async fn scan(self: &Arc<Self>) {
        let heads = match self.store.due_deliveries(256).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook outbox");
                return;
            }
        };
        for head in heads {
            let key = (head.job_id.clone(), head.endpoint);
            if !self
                .active
                .lock()
                .expect("not poisoned")
                .insert(key.clone())
            {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                let permit = me.slots.clone().acquire_owned().await;
                if permit.is_ok() {
                    me.drain(&key).await;
                }
                me.active.lock().expect("not poisoned").remove(&key);
                me.kick.notify_one();
            });
        }
    }

    /// Sends a queue's messages in order while they are due. The head is read again here (not
    /// taken from the scan): a task that just finished this queue may have sent it.
    async fn drain(&self, (job_id, endpoint): &Key) {
        loop {
            let head = match self.store.delivery_head(job_id, *endpoint).await {
                Ok(Some(h)) if h.next_attempt_at <= now_secs() => h,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, job_id, "cannot read the webhook outbox");
                    return;
                }
            };
            // Only needed where other processes send too: on SQLite this process is the only
            // one, and `active` already keeps each queue to one task.
            if self.store.dialect() == crate::store::Dialect::Postgres {
                let until = now_secs() + self.settings.timeout.as_secs_f64() + 5.0;
                match self.store.lock_delivery(head.id, &self.owner, until).await {
                    Ok(true) => {}
                    // Another replica is sending it.
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, job_id, "cannot take a webhook message");
                        return;
                    }
                }
            }
            if let Err(e) = self.attempt(&head).await {
                tracing::warn!(error = %e, job_id, "cannot record a webhook attempt");
                return;
            }
        }
    }

    /// The secret that signs messages to `d`'s endpoint now, if there is one.
    async fn secret(&self, d: &Delivery) -> Result<Option<Secret>, crate::store::StoreError> {
        Ok(match d.endpoint {
            EndpointKind::Job => self
                .store
                .job_webhook(&d.job_id)
                .await?
                .filter(|w| w.url == d.url)
                .map(|w| w.secret),
            EndpointKind::Global => self
                .settings
                .global
                .as_ref()
                .filter(|g| g.url == d.url)
                .map(|g| g.secret.clone()),
        })
    }

    /// One POST of `d`, and its outcome recorded.
    async fn attempt(&self, d: &Delivery) -> Result<(), crate::store::StoreError> {
        let shown = redacted_url(&d.url);
        let Some(secret) = self.secret(d).await? else {
            count("dead");
            return self
                .store
                .delivery_failed(
                    d.id,
                    None,
                    "no secret for this endpoint any more (WEBHOOK_URL or WEBHOOK_SECRET changed)",
                    None,
                )
                .await;
        };
        let refused = url::Url::parse(&d.url)
            .map_err(|e| e.to_string())
            .and_then(|u| self.policy.check_url(&u).map_err(|r| r.to_string()));
        if let Err(why) = refused {
            count("dead");
            return self.store.delivery_failed(d.id, None, &why, None).await;
        }
        let timestamp = now_secs() as i64;
        let signature = secret.sign(&d.msg_id, timestamp, d.payload.as_bytes());
        let sent = self
            .client
            .post(&d.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await;
        let (status, why, wait) = match sent {
            Ok(resp) if resp.status().is_success() => {
                count("delivered");
                return self
                    .store
                    .delivery_succeeded(d.id, resp.status().as_u16())
                    .await;
            }
            Ok(resp) if resp.status() == http::StatusCode::GONE => {
                count("gone");
                tracing::warn!(url = %shown, job_id = %d.job_id, "webhook endpoint answered 410 Gone: nothing more is sent to it");
                return self.store.endpoint_gone(d.id, &d.url).await;
            }
            Ok(resp) => {
                let status = resp.status();
                let wait = retry_after(resp.headers());
                let body: String = resp
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(ERROR_BODY_CHARS)
                    .collect();
                let why = if body.trim().is_empty() {
                    format!("the endpoint answered {status}")
                } else {
                    format!("the endpoint answered {status}: {}", body.trim())
                };
                (Some(status.as_u16()), why, wait)
            }
            Err(e) => {
                if let Some(r) = refusal(&e) {
                    count("dead");
                    return self
                        .store
                        .delivery_failed(d.id, None, &r.to_string(), None)
                        .await;
                }
                (None, describe(&e, &shown), None)
            }
        };
        let retry = d.attempts as u32 + 1;
        let delay = match wait {
            Some(w) => w.min(self.settings.max_age),
            None => self.backoff.delay(retry, None),
        };
        let retry_at = now_secs() + delay.as_secs_f64();
        let give_up = retry_at - d.queued_at > self.settings.max_age.as_secs_f64();
        count(if give_up { "dead" } else { "retry" });
        tracing::info!(url = %shown, job_id = %d.job_id, attempt = retry, error = %why, dead = give_up, "webhook not delivered");
        self.store
            .delivery_failed(d.id, status, &why, (!give_up).then_some(retry_at))
            .await
    }
}

fn count(outcome: &'static str) {
    metrics::counter!("free_roam_webhook_attempts_total", "outcome" => outcome).increment(1);
}

/// A transport error in words, without the URL's password.
fn describe(e: &reqwest::Error, shown: &str) -> String {
    if e.is_timeout() {
        return format!("no answer from {shown} within WEBHOOK_TIMEOUT_SECS");
    }
    if e.is_connect() {
        return format!("cannot connect to {shown}");
    }
    // Not `e.to_string()`: it names the URL, password and all.
    let mut message = String::from("the request failed");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}
