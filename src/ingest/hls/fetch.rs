//! HTTP fetching for HLS: timeouts, size limits, retries with capped jittered backoff, the
//! SSRF guard on every connection and redirect.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::RANGE;
use reqwest::StatusCode;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::playlist::Resource;
use crate::ingest::ssrf::{refusal, GuardedResolver, NetworkPolicy, Refused};
use crate::retry::Backoff;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("HTTP {status} from {url}")]
    Status {
        status: u16,
        url: String,
        retry_after: Option<Duration>,
    },
    #[error("{url} is larger than the limit of {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("timed out fetching {url}")]
    Timeout { url: String },
    #[error("network error fetching {url}: {message}")]
    Network { url: String, message: String },
    #[error("cancelled")]
    Cancelled,
}

impl FetchError {
    /// Worth another attempt: timeouts, connection errors, 404 (live edges lag), 408, 429, 5xx.
    pub fn retriable(&self) -> bool {
        match self {
            FetchError::Status { status, .. } => {
                matches!(*status, 404 | 408 | 425 | 429) || *status >= 500
            }
            FetchError::Timeout { .. } | FetchError::Network { .. } => true,
            FetchError::Refused(_) | FetchError::TooLarge { .. } | FetchError::Cancelled => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct FetchSettings {
    pub timeout: Duration,
    pub backoff: Backoff,
    pub max_redirects: usize,
}

#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    policy: Arc<NetworkPolicy>,
    settings: FetchSettings,
}

impl Fetcher {
    pub fn new(policy: NetworkPolicy, settings: FetchSettings) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let redirect_policy = policy.clone();
        let max_redirects = settings.max_redirects;
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= max_redirects {
                    return attempt.error(format!("more than {max_redirects} redirects"));
                }
                match redirect_policy.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .timeout(settings.timeout)
            .user_agent(concat!("free-roam/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            client,
            policy,
            settings,
        })
    }

    /// Fetches `resource` (at most `limit` bytes), retrying what is worth retrying.
    pub async fn fetch(
        &self,
        resource: &Resource,
        limit: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<u8>, FetchError> {
        self.fetch_sized(resource, limit, cancel)
            .await
            .map(|f| f.body)
    }

    /// [`Fetcher::fetch`], saying also how large the whole resource is and whether the
    /// server honoured the range.
    pub async fn fetch_sized(
        &self,
        resource: &Resource,
        limit: usize,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let mut attempt = 0;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                r = self.fetch_once(resource, limit) => r,
            };
            match result {
                Ok(bytes) => return Ok(bytes),
                Err(e) if e.retriable() && self.settings.backoff.allows(attempt + 1) => {
                    attempt += 1;
                    let retry_after = match &e {
                        FetchError::Status { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let wait = self.settings.backoff.delay(attempt, retry_after);
                    tracing::debug!(url = %resource.url, error = %e, attempt, ?wait, "fetch failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(FetchError::Cancelled),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch_once(&self, resource: &Resource, limit: usize) -> Result<Fetched, FetchError> {
        let url = &resource.url;
        self.policy.check_url(url)?;
        let mut req = self.client.get(url.clone());
        if let Some(r) = resource.range {
            req = req.header(
                RANGE,
                format!(
                    "bytes={}-{}",
                    r.offset,
                    r.offset + r.length.saturating_sub(1)
                ),
            );
        }
        let mut resp = req.send().await.map_err(|e| classify(url, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                status: status.as_u16(),
                url: url.to_string(),
                retry_after: crate::retry::retry_after(resp.headers()),
            });
        }
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        let total = if status == StatusCode::PARTIAL_CONTENT {
            resp.headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit_once('/'))
                .and_then(|(_, total)| total.trim().parse().ok())
        } else {
            resp.content_length()
        };
        let ranged = status == StatusCode::PARTIAL_CONTENT;
        let mut body = Vec::with_capacity(
            resp.content_length().unwrap_or(64 * 1024).min(limit as u64) as usize,
        );
        while let Some(chunk) = resp.chunk().await.map_err(|e| classify(url, e))? {
            if body.len() + chunk.len() > limit {
                return Err(FetchError::TooLarge {
                    url: url.to_string(),
                    limit,
                });
            }
            body.extend_from_slice(&chunk);
        }
        // A server that ignores Range sends the whole resource: cut the part out.
        let total = total.or(Some(body.len() as u64).filter(|_| !ranged));
        if let (Some(r), StatusCode::OK) = (resource.range, status) {
            let start = (r.offset as usize).min(body.len());
            let end = (start + r.length as usize).min(body.len());
            body = body[start..end].to_vec();
        }
        Ok(Fetched {
            body,
            total,
            ranged,
        })
    }
}

/// What one fetch brought.
#[derive(Debug)]
pub struct Fetched {
    pub body: Vec<u8>,
    /// The whole resource's size, when the server said it.
    pub total: Option<u64>,
    /// The server answered the range with 206 (false: it sent the whole resource).
    pub ranged: bool,
}

fn classify(url: &Url, e: reqwest::Error) -> FetchError {
    if let Some(refused) = refusal(&e) {
        return FetchError::Refused(refused);
    }
    if e.is_timeout() {
        return FetchError::Timeout {
            url: url.to_string(),
        };
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    FetchError::Network {
        url: url.to_string(),
        message,
    }
}
