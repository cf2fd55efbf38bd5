//! `POST /api/v1/volunteers`: short-lived volunteer tokens for anonymous tabs, when the
//! coordinator runs with `--volunteers open` (the default). With `--volunteers token` the
//! endpoint refuses, and a tab needs a token from the operator in its URL (`#token=…`).
//!
//! Handing out tokens to anyone is what makes "open a tab to help" one click; the limit per
//! client address (a token bucket) keeps one address from minting thousands of identities.
//! The address is the TCP peer's: a proxy in front would need to be trusted explicitly,
//! and `X-Forwarded-For` from an untrusted client is not.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use serde::Serialize;
use tabgrid_shared::claims::Role;

use crate::error::ApiError;
use crate::server::AppState;

/// Whether anonymous tabs may get a volunteer token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolunteerMode {
    Open,
    Token,
}

impl FromStr for VolunteerMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(VolunteerMode::Open),
            "token" => Ok(VolunteerMode::Token),
            other => Err(format!("expected open or token, not {other:?}")),
        }
    }
}

/// How long a page's token lives; the page fetches a new one when it is refused.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Tokens one address may take at once, and how fast that allowance refills.
pub const BURST: f64 = 10.0;
pub const REFILL_EVERY: Duration = Duration::from_secs(6);
/// Addresses remembered before idle (full) buckets are dropped.
const MAX_TRACKED: usize = 10_000;

/// Token buckets per client address.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// Takes one token for `ip` at `now`, or says how long until one is there.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let refill = |bucket: &Bucket| {
            let earned =
                now.saturating_duration_since(bucket.at).as_secs_f64() / REFILL_EVERY.as_secs_f64();
            (bucket.tokens + earned).min(BURST)
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&ip) {
            buckets.retain(|_, bucket| refill(bucket) < BURST);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: BURST,
            at: now,
        });
        let tokens = refill(bucket);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            Err(REFILL_EVERY.mul_f64(1.0 - tokens))
        }
    }
}

#[derive(Serialize)]
pub struct VolunteerToken {
    token: String,
    expires_in: u64,
}

/// `POST /api/v1/volunteers`.
pub async fn issue(
    State(state): State<AppState>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
) -> Result<(StatusCode, Json<VolunteerToken>), ApiError> {
    if state.config.volunteers == VolunteerMode::Token {
        return Err(ApiError::Forbidden(
            "this coordinator hands out no volunteer tokens (serve --volunteers token); \
             ask its operator for a link with #token=…"
                .to_owned(),
        ));
    }
    let ip = peer.map_or(IpAddr::from([127, 0, 0, 1]), |p| p.0.0.ip());
    if let Err(wait) = state.volunteer_limiter.take(ip, Instant::now()) {
        return Err(ApiError::RateLimited(format!(
            "too many volunteer tokens for {ip}; try again in {} s",
            wait.as_secs().max(1)
        )));
    }
    let subject = format!("tab-{}", uuid::Uuid::new_v4().simple());
    let token = state.keys.mint(&subject, Role::Volunteer, TOKEN_TTL);
    tracing::info!(%ip, subject, "volunteer token issued");
    Ok((
        StatusCode::CREATED,
        Json(VolunteerToken {
            token,
            expires_in: TOKEN_TTL.as_secs(),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill_per_address() {
        let limiter = RateLimiter::default();
        let start = Instant::now();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        for _ in 0..10 {
            assert!(limiter.take(a, start).is_ok());
        }
        let wait = limiter.take(a, start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= REFILL_EVERY);
        // Another address has its own allowance.
        assert!(limiter.take(b, start).is_ok());
        assert!(limiter.take(a, start + REFILL_EVERY).is_ok());
        assert!(limiter.take(a, start + REFILL_EVERY).is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!("open".parse(), Ok(VolunteerMode::Open));
        assert_eq!("token".parse(), Ok(VolunteerMode::Token));
        assert!("closed".parse::<VolunteerMode>().is_err());
    }
}
