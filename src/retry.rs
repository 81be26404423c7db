//! Retry policy: capped exponential backoff with full jitter, shared by every network client.
//!
//! Callers classify their own errors as retriable or not; this only says how long to wait
//! before attempt `n` and when to give up. A server's `Retry-After` wins when it is given.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// Wait before the first retry (before jitter).
    pub base: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub attempts: u32,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration, attempts: u32) -> Self {
        Self {
            base,
            cap,
            attempts,
        }
    }

    /// Whether attempt number `attempt` (0-based) may still be made.
    pub fn allows(&self, attempt: u32) -> bool {
        attempt < self.attempts
    }

    /// Wait before retry number `retry` (1 for the first retry): uniformly random in
    /// `[0, min(cap, base * 2^(retry-1))]`, or `retry_after` if the server said so (capped).
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.cap);
        }
        let exp = self
            .base
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let ceiling = exp.min(self.cap);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=millis.max(1)))
    }
}

/// A `Retry-After` header's wait: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let mut h = http::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(http::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(600);
        h.insert(
            http::header::RETRY_AFTER,
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(590) && d <= Duration::from_secs(600),
            "{d:?}"
        );
        h.insert(http::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn delays_are_capped_and_jittered() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 5);
        for retry in 1..10 {
            let d = b.delay(retry, None);
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let first: Vec<_> = (0..50).map(|_| b.delay(1, None)).collect();
        assert!(first.iter().all(|d| *d <= Duration::from_millis(100)));
        assert!(first.iter().any(|d| *d != first[0]), "jittered");
        assert_eq!(
            b.delay(3, Some(Duration::from_secs(7))),
            Duration::from_secs(1),
            "Retry-After is honoured but capped"
        );
        assert!(b.allows(4) && !b.allows(5));
    }
}
