//! Rate limits (`[rate]`, PROTOCOL.md "Limits, rate limits, keys and tokens"): appends per
//! principal, connects and authentication failures per client IP, ephemeral events per socket.
//!
//! Every limit is a sliding window: the count of the current window plus the previous window's
//! count weighted by how much of it still overlaps the last `period` (the estimate Redis users
//! know from Cloudflare's write-up). A request is let through while that estimate stays within the
//! limit; one past it is refused with how long until it would pass (`Retry-After`).
//!
//! In a cluster the windows are shared through Redis without a round trip per request: each node
//! counts locally, and a sync task adds its new counts to `ferry:rl:{limit}:{key}:{window}` and
//! reads the cluster's totals back every [`SYNC_EVERY`]. A node decides on the last totals it read
//! plus what it counted since, so the limit holds cluster-wide up to what the other nodes let
//! through within one sync interval. Without Redis (or while it is unreachable) each node limits on
//! its own counts.
//!
//! Memory is bounded: a key unused for two periods is dropped, and at most [`MAX_KEYS`] keys are
//! tracked per limit (past that a new key is let through uncounted, and counted in
//! `ferry_rate_limited_total{limit="untracked"}` so an operator sees it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::error::ApiError;

/// How often a cluster node adds its counts to Redis and reads the totals back.
pub const SYNC_EVERY: Duration = Duration::from_millis(100);
/// Keys tracked per limit.
pub const MAX_KEYS: usize = 200_000;

/// `N` events per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
}

impl Rate {
    /// `N/s`, `N/m` (also `N/h`), or `0` (no limit → `None`).
    pub fn parse(text: &str) -> Result<Option<Rate>, String> {
        let text = text.trim();
        if text == "0" {
            return Ok(None);
        }
        let bad = || format!("{text:?} is not a rate: expected N/s, N/m or 0");
        let (count, unit) = text.split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Ok(None);
        }
        Ok(Some(Rate { count, period }))
    }
}

/// The limits, for metrics and Redis keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    Appends,
    ConnectsPerIp,
    AuthFailuresPerIp,
    Ephemeral,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Appends => "appends",
            Limit::ConnectsPerIp => "connects_per_ip",
            Limit::AuthFailuresPerIp => "auth_failures_per_ip",
            Limit::Ephemeral => "ephemeral",
        }
    }
}

/// Refused: how long until the request would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub limit: Limit,
    pub retry_after_ms: u64,
}

impl From<Limited> for ApiError {
    fn from(l: Limited) -> ApiError {
        ApiError::rate_limited(l.limit.as_str(), l.retry_after_ms)
    }
}

/// One key's counts.
#[derive(Debug, Clone, Default)]
struct Window {
    /// Index of the current window (`now / period`).
    index: u64,
    /// Count of the current window this node knows the cluster has (0 without Redis).
    synced: u64,
    /// Counted here in the current window and not yet added to Redis.
    pending: u64,
    /// The previous window's total.
    previous: u64,
    /// Counted here in the previous window and not yet added to Redis (a window rolled between
    /// syncs).
    pending_previous: u64,
    /// Window index of the last use, to drop keys nobody uses.
    last_used: u64,
}

impl Window {
    fn roll(&mut self, index: u64) {
        if index == self.index {
            return;
        }
        if index == self.index + 1 {
            self.previous = self.synced + self.pending;
            self.pending_previous = self.pending;
        } else {
            self.previous = 0;
            self.pending_previous = 0;
        }
        self.index = index;
        self.synced = 0;
        self.pending = 0;
    }

    /// The sliding estimate at `fraction` (0..1) of the current window.
    fn estimate(&self, fraction: f64) -> f64 {
        self.previous as f64 * (1.0 - fraction) + (self.synced + self.pending) as f64
    }
}

/// A sliding-window limiter over string keys.
pub struct Limiter {
    limit: Limit,
    rate: Rate,
    windows: Mutex<HashMap<Box<str>, Window>>,
}

impl Limiter {
    pub fn new(limit: Limit, rate: Rate) -> Limiter {
        Limiter {
            limit,
            rate,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn period_ms(&self) -> u64 {
        (self.rate.period.as_millis() as u64).max(1)
    }

    /// Counts one event for `key` at `now_ms` if the limit allows it.
    pub fn check(&self, key: &str, now_ms: u64) -> Result<(), Limited> {
        let period = self.period_ms();
        let index = now_ms / period;
        let fraction = (now_ms % period) as f64 / period as f64;
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if !windows.contains_key(key) {
            if windows.len() >= MAX_KEYS {
                windows.retain(|_, w| w.last_used + 1 >= index);
            }
            if windows.len() >= MAX_KEYS {
                crate::metrics::count_rate_limited("untracked");
                return Ok(());
            }
            windows.insert(
                key.into(),
                Window {
                    index,
                    last_used: index,
                    ..Window::default()
                },
            );
        }
        let Some(window) = windows.get_mut(key) else {
            return Ok(());
        };
        window.roll(index);
        window.last_used = index;
        let limit = self.rate.count as f64;
        if window.estimate(fraction) + 1.0 <= limit {
            window.pending += 1;
            return Ok(());
        }
        let retry_after_ms = retry_after(window, self.rate.count, fraction, period);
        drop(windows);
        crate::metrics::count_rate_limited(self.limit.as_str());
        Err(Limited {
            limit: self.limit,
            retry_after_ms,
        })
    }

    /// Whether `key` is over its limit right now, without counting anything.
    pub fn over(&self, key: &str, now_ms: u64) -> Option<Limited> {
        let period = self.period_ms();
        let index = now_ms / period;
        let fraction = (now_ms % period) as f64 / period as f64;
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let window = windows.get_mut(key)?;
        window.roll(index);
        if window.estimate(fraction) + 1.0 <= self.rate.count as f64 {
            return None;
        }
        let retry_after_ms = retry_after(window, self.rate.count, fraction, period);
        Some(Limited {
            limit: self.limit,
            retry_after_ms,
        })
    }

    /// Drops keys unused for two windows.
    pub fn prune(&self, now_ms: u64) {
        let index = now_ms / self.period_ms();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.retain(|_, w| w.last_used + 1 >= index);
        if windows.capacity() > 4 * windows.len().max(64) {
            windows.shrink_to_fit();
        }
    }

    /// Takes what this node counted since the last sync: `(key, window index, count)`.
    fn take_pending(&self, now_ms: u64) -> Vec<(Box<str>, u64, u64)> {
        let index = now_ms / self.period_ms();
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (key, window) in windows.iter_mut() {
            window.roll(index);
            if window.pending_previous > 0 {
                out.push((key.clone(), window.index - 1, window.pending_previous));
                window.pending_previous = 0;
            }
            if window.pending > 0 {
                out.push((key.clone(), window.index, window.pending));
                window.synced += window.pending;
                window.pending = 0;
            } else if window.last_used + 1 >= index {
                // Still read the totals: the other nodes may be counting this key.
                out.push((key.clone(), window.index, 0));
            }
        }
        out
    }

    /// Takes the cluster totals read back from Redis for window `index` of `key`.
    fn set_totals(&self, key: &str, index: u64, current: u64, previous: u64) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = windows.get_mut(key) {
            if window.index == index {
                // What was counted here since the snapshot stays pending on top.
                window.synced = current;
                window.previous = window.previous.max(previous);
            }
        }
    }
}

/// Milliseconds until one more event would fit the window.
fn retry_after(window: &Window, limit: u64, fraction: f64, period: u64) -> u64 {
    let current = (window.synced + window.pending) as f64;
    let limit = limit as f64;
    let remaining = 1.0 - fraction;
    let wait_periods = if current + 1.0 <= limit && window.previous > 0 {
        // Within this window, once enough of the previous one has slid out.
        let needed = 1.0 - (limit - 1.0 - current) / window.previous as f64;
        (needed - fraction).max(0.0)
    } else {
        // In the next window this window's count is the previous one.
        let next = if current > 0.0 {
            (1.0 - (limit - 1.0) / current).max(0.0)
        } else {
            0.0
        };
        remaining + next
    };
    ((wait_periods * period as f64).ceil() as u64).max(1)
}

/// WebSockets and SSE streams open per principal on this node (`limits.max_sockets_per_principal`).
pub struct OpenSockets {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open socket of a principal; dropping it frees its place.
pub struct SocketPlace {
    subject: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for SocketPlace {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.subject) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

impl OpenSockets {
    pub fn new(max: usize) -> OpenSockets {
        OpenSockets {
            max,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A place for one more socket of `subject`, or `try_again` (`too_many_sockets`).
    pub fn open(&self, subject: &str) -> Result<SocketPlace, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(subject.to_owned()).or_insert(0);
        if *n >= self.max {
            crate::metrics::count_rate_limited("sockets_per_principal");
            return Err(ApiError::too_many_sockets(self.max));
        }
        *n += 1;
        Ok(SocketPlace {
            subject: subject.to_owned(),
            open: self.open.clone(),
        })
    }
}

/// The node's limiters, from `[rate]`.
pub struct RateLimits {
    pub appends: Option<Limiter>,
    pub connects_per_ip: Option<Limiter>,
    pub auth_failures_per_ip: Option<Limiter>,
    /// Per socket, so each socket makes its own [`Limiter`] (see [`RateLimits::ephemeral`]).
    pub ephemeral: Option<Rate>,
}

impl RateLimits {
    pub fn from_config(rate: &crate::config::RateSection) -> anyhow::Result<RateLimits> {
        let parse = |name: &str, text: &str| {
            Rate::parse(text).map_err(|e| anyhow::anyhow!("rate.{name}: {e}"))
        };
        Ok(RateLimits {
            appends: parse("appends", &rate.appends)?.map(|r| Limiter::new(Limit::Appends, r)),
            connects_per_ip: parse("connects_per_ip", &rate.connects_per_ip)?
                .map(|r| Limiter::new(Limit::ConnectsPerIp, r)),
            auth_failures_per_ip: parse("auth_failures_per_ip", &rate.auth_failures_per_ip)?
                .map(|r| Limiter::new(Limit::AuthFailuresPerIp, r)),
            ephemeral: parse("ephemeral", &rate.ephemeral)?,
        })
    }

    /// A fresh per-socket limiter of `chunk` and `typing` events, when that limit is on.
    pub fn ephemeral(&self) -> Option<Limiter> {
        self.ephemeral
            .map(|rate| Limiter::new(Limit::Ephemeral, rate))
    }

    pub fn check_append(&self, principal: &str) -> Result<(), Limited> {
        match &self.appends {
            Some(l) => l.check(principal, unix_ms()),
            None => Ok(()),
        }
    }

    pub fn check_connect(&self, ip: &str) -> Result<(), Limited> {
        match &self.connects_per_ip {
            Some(l) => l.check(ip, unix_ms()),
            None => Ok(()),
        }
    }

    /// Refuses a client IP that is over its authentication failures, before any credential check.
    pub fn auth_blocked(&self, ip: &str) -> Option<Limited> {
        self.auth_failures_per_ip.as_ref()?.over(ip, unix_ms())
    }

    /// Counts an authentication failure of `ip`; `Err` when it is one past the limit.
    pub fn auth_failed(&self, ip: &str) -> Result<(), Limited> {
        match &self.auth_failures_per_ip {
            Some(l) => l.check(ip, unix_ms()),
            None => Ok(()),
        }
    }

    fn shared(&self) -> impl Iterator<Item = &Limiter> {
        [
            self.appends.as_ref(),
            self.connects_per_ip.as_ref(),
            self.auth_failures_per_ip.as_ref(),
        ]
        .into_iter()
        .flatten()
    }

    /// Drops keys nobody used lately; run every few seconds.
    pub fn prune(&self) {
        let now = unix_ms();
        for limiter in self.shared() {
            limiter.prune(now);
        }
    }
}

/// Unix time in milliseconds, the clock the windows are cut by.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Prunes the limiters every few seconds and, with Redis, shares their counts cluster-wide, until
/// `stop` turns true.
pub async fn run(
    limits: Arc<RateLimits>,
    redis_url: Option<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = match redis_url.as_deref().map(redis::Client::open) {
        Some(Ok(client)) => Some(client),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "rate limits: bad redis url; limits hold per node");
            None
        }
        None => None,
    };
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::cluster::stopped(&mut stop) => return,
        }
        ticks += 1;
        if ticks.is_multiple_of(50) {
            limits.prune();
        }
        let Some(client) = &client else { continue };
        if connection.is_none() {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => connection = Some(c),
                Err(e) => {
                    if ticks % 50 == 1 {
                        tracing::warn!(error = %e, "rate limits: redis unreachable; limits hold per node meanwhile");
                    }
                    continue;
                }
            }
        }
        if let Some(c) = connection.as_mut() {
            if let Err(e) = sync(&limits, c).await {
                tracing::warn!(error = %e, "rate limits: redis sync failed; reconnecting");
                connection = None;
            }
        }
    }
}

/// One exchange with Redis: adds every limiter's new counts and reads back the totals of the
/// current and previous window of every key in use.
async fn sync(
    limits: &RateLimits,
    connection: &mut redis::aio::MultiplexedConnection,
) -> Result<(), redis::RedisError> {
    let now = unix_ms();
    for limiter in limits.shared() {
        let pending = limiter.take_pending(now);
        if pending.is_empty() {
            continue;
        }
        let period_ms = limiter.period_ms();
        let ttl = (2 * period_ms).div_ceil(1000) as i64 + 1;
        let mut pipe = redis::pipe();
        let mut reads = Vec::new();
        for (key, index, count) in &pending {
            let name = |i: u64| format!("ferry:rl:{}:{key}:{i}", limiter.limit.as_str());
            if *count > 0 {
                pipe.incr(name(*index), *count).ignore();
                pipe.expire(name(*index), ttl).ignore();
            }
            // A roll's leftover counts only add to the previous window; the totals are read for
            // the key's current window.
            if *index == now / period_ms {
                pipe.get(name(*index));
                pipe.get(name(index.saturating_sub(1)));
                reads.push((key.clone(), *index));
            }
        }
        let values: Vec<Option<u64>> = pipe.query_async(connection).await?;
        for ((key, index), pair) in reads.iter().zip(values.chunks(2)) {
            let current = pair.first().copied().flatten().unwrap_or(0);
            let previous = pair.get(1).copied().flatten().unwrap_or(0);
            limiter.set_totals(key, *index, current, previous);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(count: u64) -> Limiter {
        Limiter::new(
            Limit::Appends,
            Rate {
                count,
                period: Duration::from_secs(1),
            },
        )
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("1000/s").unwrap(),
            Some(Rate {
                count: 1000,
                period: Duration::from_secs(1)
            })
        );
        assert_eq!(
            Rate::parse("30/m").unwrap().unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!(Rate::parse("0").unwrap(), None);
        assert_eq!(Rate::parse("0/s").unwrap(), None);
        for bad in ["", "10", "10/d", "x/s", "-1/s", "1.5/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_request_past_the_limit_is_refused_until_the_window_slides() {
        let l = limiter(10);
        let start = 1_000_000;
        for i in 0..10 {
            l.check("k", start + i).unwrap();
        }
        let refused = l.check("k", start + 10).unwrap_err();
        assert_eq!(refused.limit, Limit::Appends);
        assert!(refused.retry_after_ms > 0 && refused.retry_after_ms <= 2000);
        // Another key is not affected.
        l.check("other", start + 10).unwrap();
        // Where the answer said, it passes again.
        l.check("k", start + 10 + refused.retry_after_ms).unwrap();
    }

    #[test]
    fn the_previous_window_weighs_by_its_overlap() {
        let l = limiter(10);
        for _ in 0..10 {
            l.check("k", 5_000).unwrap();
        }
        // Halfway into the next window half of the 10 still count: 5 more fit, not 10.
        let mut passed = 0;
        while l.check("k", 6_500).is_ok() {
            passed += 1;
        }
        assert_eq!(passed, 5);
    }

    #[test]
    fn a_steady_rate_at_the_limit_passes_and_twice_it_is_halved() {
        let l = limiter(100);
        let (mut ok, mut refused) = (0u64, 0u64);
        // 200/s for 10 s, one request every 5 ms.
        for t in (0..10_000).step_by(5) {
            match l.check("k", 1_000_000 + t) {
                Ok(()) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert!((950..=1100).contains(&ok), "passed {ok}");
        assert!(refused > 850, "refused {refused}");
    }

    #[test]
    fn over_does_not_count() {
        let l = limiter(2);
        assert!(l.over("k", 0).is_none());
        l.check("k", 0).unwrap();
        l.check("k", 1).unwrap();
        assert!(l.over("k", 2).is_some());
        assert!(l.over("k", 2).is_some());
        assert!(l.over("k", 2_000).is_none());
    }

    #[test]
    fn cluster_totals_count_against_the_local_decision() {
        let l = limiter(10);
        l.check("k", 10_000).unwrap();
        let pending = l.take_pending(10_000);
        assert_eq!(pending, vec![("k".into(), 10, 1)]);
        // The other nodes counted 8 more in this window.
        l.set_totals("k", 10, 9, 0);
        l.check("k", 10_001).unwrap();
        assert!(l.check("k", 10_002).is_err());
    }

    #[test]
    fn sockets_per_principal_are_counted_until_dropped() {
        let sockets = OpenSockets::new(2);
        let a = sockets.open("key:a").unwrap();
        let _b = sockets.open("key:a").unwrap();
        let refused = sockets.open("key:a").err().unwrap();
        assert_eq!(refused.reason, Some("too_many_sockets"));
        sockets.open("key:other").unwrap();
        drop(a);
        sockets.open("key:a").unwrap();
        assert_eq!(sockets.open.lock().unwrap().get("key:other"), None);
    }

    #[test]
    fn unused_keys_are_pruned() {
        let l = limiter(10);
        l.check("k", 0).unwrap();
        l.prune(1_500);
        assert_eq!(l.windows.lock().unwrap().len(), 1);
        l.prune(3_000);
        assert_eq!(l.windows.lock().unwrap().len(), 0);
    }
}
