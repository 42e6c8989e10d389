//! How the kube source retries: what a watch error means, and how long to wait before the next try.
//!
//! A 410 Gone (the watch's resourceVersion is older than the server keeps) is routine after an
//! outage or an etcd compaction: relisting is the only way forward, so it happens at once. Anything
//! else waits an exponential, jittered delay capped at `--api-retry-max-ms`; the cap bounds how
//! late the agent notices a server that is back.
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use kube::core::Status;
use kube::runtime::watcher;

/// The first retry waits about this long.
pub const INITIAL_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    pub initial: Duration,
    pub max: Duration,
}

impl RetryConfig {
    pub fn with_max(max: Duration) -> Self {
        RetryConfig { initial: INITIAL_DELAY.min(max), max }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self::with_max(Duration::from_secs(1))
    }
}

/// Exponential backoff with equal jitter: attempt n waits between half and all of
/// `min(initial * 2^n, max)`. Never less than half a step, so no agent retries in a tight loop;
/// the random half spreads a fleet of agents that all lost the server at the same moment.
#[derive(Debug)]
pub struct Backoff {
    config: RetryConfig,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        // Seeded per instance from the std's per-process random keys; no need for a crypto RNG.
        let seed = std::collections::hash_map::RandomState::new().build_hasher().finish();
        Backoff { config, attempt: 0, rng: seed | 1 }
    }

    pub fn next_delay(&mut self) -> Duration {
        let step = self.config.initial.saturating_mul(1 << self.attempt.min(20)).min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(self.unit())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// xorshift64*, mapped to [0, 1).
    fn unit(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What a failed request says about the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 410: the resourceVersion is too old; relist.
    Gone,
    /// The server answered with an error (403, 429, 500, ...): reachable, but not working for us.
    Answered,
    /// No answer: connection refused or reset, timeout, TLS failure.
    Unreachable,
}

fn is_gone(s: &Status) -> bool {
    // `reason` is the API's machine-readable StatusReason; some paths set it without the code.
    s.code == 410 || s.reason == "Expired" || s.reason == "Gone"
}

pub fn classify_client(e: &kube::Error) -> Outcome {
    match e {
        kube::Error::Api(s) if is_gone(s) => Outcome::Gone,
        kube::Error::Api(_) | kube::Error::SerdeError(_) => Outcome::Answered,
        _ => Outcome::Unreachable,
    }
}

pub fn classify(e: &watcher::Error) -> Outcome {
    match e {
        watcher::Error::WatchError(s) if is_gone(s) => Outcome::Gone,
        watcher::Error::WatchError(_) | watcher::Error::NoResourceVersion => Outcome::Answered,
        watcher::Error::InitialListFailed(c) | watcher::Error::WatchStartFailed(c) | watcher::Error::WatchFailed(c) => classify_client(c),
    }
}

fn describe_status(s: &Status) -> String {
    format!("the API server answered {} {}: {}", s.code, s.reason, s.message)
}

/// One line for status and logs. The same failure reads the same whether a watch or a probe hit
/// it, so a flapping error does not look like a new one.
pub fn describe_client(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => describe_status(s),
        e if classify_client(e) == Outcome::Unreachable => format!("no answer from the API server: {}", crate::errors::error_chain(e)),
        e => crate::errors::error_chain(e),
    }
}

pub fn describe(e: &watcher::Error) -> String {
    match e {
        watcher::Error::WatchError(s) => describe_status(s),
        watcher::Error::InitialListFailed(c) | watcher::Error::WatchStartFailed(c) | watcher::Error::WatchFailed(c) => describe_client(c),
        watcher::Error::NoResourceVersion => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str) -> Box<Status> {
        Box::new(Status { code, reason: reason.into(), message: "m".into(), ..Default::default() })
    }

    fn refused() -> kube::Error {
        kube::Error::Service(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)))
    }

    #[test]
    fn every_form_of_gone_relists() {
        use watcher::Error as E;
        assert_eq!(classify(&E::WatchError(status(410, "Expired"))), Outcome::Gone);
        assert_eq!(classify(&E::WatchError(status(0, "Gone"))), Outcome::Gone);
        assert_eq!(classify(&E::WatchStartFailed(kube::Error::Api(status(410, "")))), Outcome::Gone);
        assert_eq!(classify(&E::WatchFailed(kube::Error::Api(status(0, "Expired")))), Outcome::Gone);
        assert_eq!(classify(&E::InitialListFailed(kube::Error::Api(status(410, "Expired")))), Outcome::Gone);
    }

    #[test]
    fn answers_and_silence_are_told_apart() {
        use watcher::Error as E;
        assert_eq!(classify(&E::WatchError(status(500, "InternalError"))), Outcome::Answered);
        assert_eq!(classify(&E::WatchStartFailed(kube::Error::Api(status(403, "Forbidden")))), Outcome::Answered);
        assert_eq!(classify(&E::InitialListFailed(kube::Error::Api(status(429, "TooManyRequests")))), Outcome::Answered);
        assert_eq!(classify(&E::NoResourceVersion), Outcome::Answered);
        assert_eq!(classify(&E::WatchStartFailed(refused())), Outcome::Unreachable);
        assert_eq!(classify(&E::InitialListFailed(refused())), Outcome::Unreachable);
        let msg = describe(&E::WatchStartFailed(refused()));
        assert!(msg.starts_with("no answer from the API server: ") && msg.contains("connection refused"), "{msg}");
        assert_eq!(describe(&E::WatchStartFailed(kube::Error::Api(status(403, "Forbidden")))), "the API server answered 403 Forbidden: m");
    }

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_restart_small_after_a_reset() {
        let mut b = Backoff::new(RetryConfig::with_max(Duration::from_millis(1000)));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for (step, _) in [100.0, 200.0, 400.0, 800.0, 1000.0, 1000.0, 1000.0].iter().zip(0..) {
            let d = ms(b.next_delay());
            assert!(d >= step / 2.0 && d <= *step, "{d} ms for a {step} ms step");
        }
        b.reset();
        assert!(ms(b.next_delay()) <= 100.0);
        // A cap below the usual first step: every delay is within it.
        let mut b = Backoff::new(RetryConfig::with_max(Duration::from_millis(40)));
        assert!((0..10).all(|_| b.next_delay() <= Duration::from_millis(40)));
        // The jitter spreads: not every delay of a step is the same.
        let mut b = Backoff::new(RetryConfig::default());
        let firsts: std::collections::BTreeSet<u128> = (0..20).map(|_| { b.reset(); b.next_delay().as_micros() }).collect();
        assert!(firsts.len() > 1);
    }
}
