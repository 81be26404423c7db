//! Request middleware for `/api` routes: API-key auth, per-client rate limits, timeouts, and
//! request metrics for every route.
//!
//! Rate limiting uses `governor` directly rather than `tower_governor`: we need two quotas
//! chosen by method, a key that is the API key when one is valid, and 429 bodies in our JSON
//! error shape with IETF `RateLimit-*` headers, which `tower_governor`'s fixed responses lack.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use crate::config::RateLimitSettings;

type Keyed =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

struct Limit {
    limiter: Keyed,
    per_minute: u32,
    burst: u32,
}

impl Limit {
    fn new(per_minute: u32, burst: u32) -> Self {
        let quota = Quota::per_minute(NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            limiter: RateLimiter::keyed(quota).with_middleware::<StateInformationMiddleware>(),
            per_minute,
            burst,
        }
    }
}

/// The two quotas (reads, mutating calls), keyed per client.
pub struct RateLimits {
    settings: RateLimitSettings,
    read: Limit,
    write: Limit,
}

impl RateLimits {
    pub fn new(settings: &RateLimitSettings) -> Arc<Self> {
        Arc::new(Self {
            settings: settings.clone(),
            read: Limit::new(settings.read_per_minute, settings.read_burst),
            write: Limit::new(settings.write_per_minute, settings.write_burst),
        })
    }

    /// Forgets clients whose buckets are full again, so memory follows active clients only.
    pub fn forget_idle(&self) {
        for l in [&self.read, &self.write] {
            l.limiter.retain_recent();
            l.limiter.shrink_to_fit();
        }
    }
}

/// The bearer token, if the request carries one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Index of the configured key equal to `token`, compared in constant time.
fn matching_key(keys: &[String], token: &str) -> Option<usize> {
    let mut found = None;
    for (i, key) in keys.iter().enumerate() {
        if bool::from(key.as_bytes().ct_eq(token.as_bytes())) {
            found = Some(i);
        }
    }
    found
}

/// Requires `Authorization: Bearer <key>` on every `/api` route when API_KEYS is set.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.settings.api_keys;
    if keys.is_empty()
        || bearer(req.headers())
            .and_then(|t| matching_key(keys, t))
            .is_some()
    {
        return next.run(req).await;
    }
    let mut response = ApiError::Unauthorized.into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn client_key(state: &AppState, req: &Request) -> String {
    if let Some(i) = bearer(req.headers()).and_then(|t| matching_key(&state.settings.api_keys, t)) {
        return format!("key:{i}");
    }
    if state.rate_limits.settings.trust_proxy {
        let forwarded = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|ip| ip.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return format!("ip:{ip}");
        }
    }
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()),
        None => "ip:unknown".to_owned(),
    }
}

/// Per-client quotas: reads (GET, HEAD) and mutating calls (everything else) counted apart.
pub async fn rate_limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limits = &state.rate_limits;
    if !limits.settings.enabled {
        return next.run(req).await;
    }
    let limit = if matches!(*req.method(), Method::GET | Method::HEAD) {
        &limits.read
    } else {
        &limits.write
    };
    let key = client_key(&state, &req);
    let policy = format!("{};w=60;burst={}", limit.per_minute, limit.burst);
    match limit.limiter.check_key(&key) {
        Ok(snapshot) => {
            let mut response = next.run(req).await;
            let h = response.headers_mut();
            insert(h, "ratelimit-limit", limit.burst.to_string());
            insert(
                h,
                "ratelimit-remaining",
                snapshot.remaining_burst_capacity().to_string(),
            );
            insert(h, "ratelimit-policy", policy);
            response
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            metrics::counter!("free_roam_rate_limited_total").increment(1);
            let mut response = ApiError::TooManyRequests {
                message: format!("rate limit exceeded: retry in {secs} s"),
                retry_after_secs: secs,
                code: "rate_limited",
            }
            .into_response();
            let h = response.headers_mut();
            insert(h, "ratelimit-limit", limit.burst.to_string());
            insert(h, "ratelimit-remaining", "0".to_owned());
            insert(h, "ratelimit-reset", secs.to_string());
            insert(h, "ratelimit-policy", policy);
            response
        }
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(name, v);
    }
}

/// Answers 503 with a JSON error when a request runs past REQUEST_TIMEOUT_SECS.
pub async fn timeout(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.settings.request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(limit.as_secs()).into_response(),
    }
}

/// Counts requests and their latency by route template (never the raw URL).
pub async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("free_roam_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("free_roam_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

/// Largest body read and thrown away to answer an oversized request with a clean 413.
const DRAIN_CAP: u64 = 64 << 20;

/// Answers a request whose Content-Length is over MAX_BODY_BYTES with 413 before any handler
/// runs. The body is read and discarded (up to 64 MiB) first, so the client, still sending,
/// receives the JSON error instead of a reset connection; beyond that the connection closes.
pub async fn reject_oversized(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.settings.max_body_bytes as u64;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(declared) = declared.filter(|n| *n > limit) else {
        return next.run(req).await;
    };
    let mut response = ApiError::PayloadTooLarge.into_response();
    if declared <= DRAIN_CAP {
        use futures::StreamExt;
        let mut body = req.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    } else {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
