//! Budgets and key health shared by several ProxyPal replicas through Redis.
//!
//! N replicas that each count their own windows send N times the quota.
//! Here every admission is decided in Redis, atomically, by one Lua script
//! per attempt on Redis's own clock (`TIME`), so replicas on hosts with
//! skewed clocks still count one window:
//!
//! - **Rolling windows** are exact sliding logs (a sorted set per key and
//!   window, scored by Redis microseconds): at most `limit` admissions in
//!   any interval of the window, bursts included — what NVIDIA's rolling
//!   minute allows, where fixed-minute counters let twice the limit through
//!   at an edge and GCRA with burst 1 serves a burst of 40 over a minute.
//! - **Key health** (a cooldown's end, a disabled key) is read in the same
//!   script, so a key one replica found rate limited or rejected is skipped
//!   by the others with no propagation delay. Cooldowns only grow.
//! - **State loss** (Redis restarted empty, `FLUSHALL`, failover to an
//!   empty replica) is detected by an epoch key created with `SET NX`: the
//!   caller learns that the shared windows forgot what the upstream still
//!   counts.
//! - **Keys** in Redis hold fingerprints only, never an API key. Every key
//!   of one pool shares the hash tag `{pool}`, so one script's keys live in
//!   one Redis Cluster slot.
//! - **One round trip per attempt**, bounded by a deadline; the script is
//!   cached (`EVALSHA`) and reloaded by redis-rs when Redis answers
//!   `NOSCRIPT` (after a restart or `SCRIPT FLUSH`).
//!
//! This crate is the Redis side only: what the gateway does when Redis is
//! slow or gone (a local share of each window that can never push the total
//! over the quota) is built on top of it.
//!
//! ```no_run
//! # async fn example() -> Result<(), proxypal_shared::SharedError> {
//! use std::time::Duration;
//! use proxypal_shared::{Candidate, SharedBudgets, SharedConfig, Window};
//!
//! let shared = SharedBudgets::connect(SharedConfig::new("redis://127.0.0.1:6379/0")).await?;
//! let minute = [Window::new("m", Duration::from_millis(60_500), 40)];
//! let candidates = [
//!     Candidate::new("sha256:0f1e…", &minute), // key fingerprints, in round-robin order
//!     Candidate::new("sha256:9a8b…", &minute),
//! ];
//! match shared.admit("nvidia", &candidates).await?.admitted {
//!     Some(index) => println!("send with key {index}"),
//!     None => println!("nothing has room"),
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod cache;
#[cfg(feature = "testing")]
pub mod testing;

pub use cache::SharedCache;

use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

/// How to reach Redis and name what this deployment keeps there.
#[derive(Clone)]
#[non_exhaustive]
pub struct SharedConfig {
    /// `redis://host:port/db` (or `rediss://` with a TLS-enabled build).
    pub url: String,
    /// Namespace of every key, so several deployments can share one Redis
    /// (default `proxypal`). No `{` or `}`: the hash tag is the pool's.
    pub key_prefix: String,
    /// Deadline of each call on the request path (default 50 ms).
    pub timeout: Duration,
    /// For `rediss://`: the CA certificate(s) (PEM) to trust instead of the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A URL may carry a password: show only where it points.
        f.debug_struct("SharedConfig")
            .field("url", &redacted(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "…"))
            .finish()
    }
}

/// `url` without a password (`redis://user:…@host:port/0`, and a `pass=`
/// or `password=` query value of a `redis+unix://` URL).
pub fn redacted(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:…{}", &base[..scheme + 3], &base[at..])
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") => {
                    format!("{k}=…")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

impl SharedConfig {
    /// The defaults at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            key_prefix: "proxypal".to_owned(),
            timeout: Duration::from_millis(50),
            ca_pem: None,
        }
    }
}

/// Why a call to Redis gave no answer to act on. The caller treats every one
/// of them alike: the shared state cannot be read now.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SharedError {
    /// The URL is not a Redis URL (the message never contains a password).
    #[error("shared.redis_url: {reason}")]
    Url {
        /// What is wrong.
        reason: String,
    },
    /// No answer within the deadline (a call that timed out may have been
    /// carried out: count it as used).
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something this version does not expect.
    #[error("redis: unexpected answer from the admit script: {0}")]
    Reply(String),
    /// A pool name or id that cannot be used in a key.
    #[error("{0}")]
    Invalid(String),
    /// A calendar window does not hold Redis's clock: recompute it for
    /// `now_us` and ask again (nothing was charged).
    #[error("a calendar window does not hold Redis's clock ({now_us} us): recompute it")]
    StaleCalendar {
        /// Redis's clock, Unix microseconds.
        now_us: u64,
    },
}

/// What a window counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Kind {
    /// Requests admitted.
    #[default]
    Requests,
    /// Tokens: each request reserves its estimate, replaced by its use when
    /// it [settles](SharedBudgets::settle).
    Tokens,
    /// Requests in flight (`period`: how long a slot is held at most, so a
    /// crashed replica's slots expire).
    Concurrency,
}

/// One window of a budget as Redis counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window<'a> {
    /// What it counts.
    pub kind: Kind,
    /// Whose budget it is: a key's fingerprint, or an account's id shared by
    /// several keys (`None`: the candidate's own). Part of its Redis key.
    pub budget: Option<&'a str>,
    /// Its name within the budget (`m` for the minute, `d` for the day, …),
    /// part of its Redis key.
    pub name: &'a str,
    /// Its period, margin included.
    pub period: Duration,
    /// Admissions allowed in any interval of `period` (or in the calendar
    /// window).
    pub limit: u64,
    /// A calendar window instead of a rolling one: `[start, end)` in Unix
    /// microseconds of Redis's clock (a day from `00:00` in the provider's
    /// zone, resolved by the caller: Redis has no time zones). Its counter
    /// is named by its end.
    pub calendar: Option<(u64, u64)>,
}

impl<'a> Window<'a> {
    /// At most `limit` admissions in any interval of `period`.
    pub fn new(name: &'a str, period: Duration, limit: u64) -> Self {
        Self { kind: Kind::Requests, budget: None, name, period, limit, calendar: None }
    }

    /// At most `limit` tokens (reserved or used) in any interval of `period`.
    pub fn tokens(name: &'a str, period: Duration, limit: u64) -> Self {
        Self { kind: Kind::Tokens, ..Self::new(name, period, limit) }
    }

    /// At most `limit` requests in flight, each slot held at most `lease`.
    pub fn concurrency(name: &'a str, lease: Duration, limit: u64) -> Self {
        Self { kind: Kind::Concurrency, ..Self::new(name, lease, limit) }
    }

    /// The same window counting `kind`.
    pub fn counting(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// At most `limit` admissions from `start_us` to `end_us` (Unix
    /// microseconds, Redis's clock): a day that resets at a fixed time.
    pub fn calendar(name: &'a str, start_us: u64, end_us: u64, limit: u64) -> Self {
        let period = Duration::from_micros(end_us.saturating_sub(start_us));
        Self { kind: Kind::Requests, budget: None, name, period, limit, calendar: Some((start_us, end_us)) }
    }

    /// The same window of `budget` (an account several candidates share)
    /// rather than of the candidate.
    pub fn of(mut self, budget: &'a str) -> Self {
        self.budget = Some(budget);
        self
    }
}

/// One key a request may be sent with: its fingerprint and every window of
/// its budgets (all must have room; all are charged together).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The key's fingerprint (never the key).
    pub id: &'a str,
    /// Its windows.
    pub windows: &'a [Window<'a>],
}

impl<'a> Candidate<'a> {
    /// Key `id` with `windows`.
    pub fn new(id: &'a str, windows: &'a [Window<'a>]) -> Self {
        Self { id, windows }
    }
}

/// What an admission attempt decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Admission {
    /// The candidate admitted (its position), charged in every window; `None`
    /// when none had room.
    pub admitted: Option<usize>,
    /// When none had room: how long until the first might (a cooldown's end
    /// or the oldest entry leaving a full window); `None` when every
    /// candidate is disabled.
    pub wait: Option<Duration>,
    /// Redis's clock at the decision, microseconds since the Unix epoch.
    pub now_us: u64,
    /// The pool's epoch was just created: Redis had lost (or never had) this
    /// pool's state, so its windows forgot what the upstream still counts.
    pub state_lost: bool,
    /// Replicas whose lease lapsed and whose shares were kept back.
    pub suspects: u64,
    /// The pool's epoch (when its state was created, Redis microseconds): a
    /// different value than last seen means the state was lost meanwhile.
    pub epoch: u64,
    /// Nothing was admitted because the pool's state was lost recently and
    /// not every replica has replayed what it sent (see
    /// [`SharedBudgets::replayed`]).
    pub recovering: bool,
    /// The admission's number, to [`settle`](SharedBudgets::settle) it.
    pub request: u64,
}

/// Key health as Redis holds it (see [`SharedBudgets::health`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Keys cooling down: (id, until µs on Redis's clock).
    pub cooling: Vec<(String, u64)>,
    /// Disabled keys.
    pub disabled: Vec<String>,
    /// Redis's clock, Unix microseconds.
    pub now_us: u64,
}

/// Who serves a pool, as its heartbeats say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Membership {
    /// Replicas whose lease runs (this one included).
    pub live: u64,
    /// Replicas whose lease lapsed within the reservation: possibly serving
    /// from their local share without Redis.
    pub suspects: u64,
    /// The pool's epoch (see [`Admission::epoch`]).
    pub epoch: u64,
    /// Redis's clock, Unix microseconds.
    pub now_us: u64,
    /// This replica has replayed its admissions into this epoch.
    pub replayed: bool,
}

/// Creates the pool's epoch when missing (its state was lost: forget who
/// replayed). Shared head of the admit and heartbeat scripts: KEYS[3] epoch,
/// KEYS[6] replayed set.
const EPOCH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function s(x) return string.format('%.0f', x) end
local lost = 0
if redis.call('SET', KEYS[3], s(now), 'NX') then
  lost = 1
  redis.call('DEL', KEYS[6])
end
local epoch = tonumber(redis.call('GET', KEYS[3]))
";

/// The admit script (after [`EPOCH`]). KEYS: 1 cooldowns (HASH id → until
/// µs), 2 disabled (HASH id → since µs), 3 epoch (STRING), 4 members (ZSET
/// replica → lease end µs), 5 member shares (HASH replica → N), 6 replicas
/// that replayed into this epoch (SET), 7 learned limits (HASH log key →
/// limit), then one key per window of each candidate in order. ARGV: 1
/// request id, 2 log TTL slack (ms), 3 the N of a suspect that recorded none
/// (0: keep no shares back), 4 how long after an epoch's creation missing
/// replays hold admissions (µs), 5 replays expected, 6 the request's token
/// reservation, then per candidate: id, window count, and per window: kind
/// (0 requests, 1 tokens, 2 concurrency), period µs (a concurrency slot's
/// lease; a calendar window's start µs), calendar end µs (0: rolling),
/// limit.
///
/// - Requests: a rolling log (ZSET, one member per admission) or a calendar
///   counter named by its end.
/// - Tokens: a rolling log whose members are `<request>:R:<tokens>` while
///   reserved and `<request>:<tokens>` once settled (a request is admitted
///   while the window holds less than its limit; it reserves min(reservation,
///   limit), replaced by its use when it settles; a window full of
///   reservations says "look again in 20 ms"), or a calendar counter.
/// - Concurrency: a ZSET of requests in flight scored by their lease's end,
///   so a crashed replica's slots expire.
///
/// A member whose lease lapsed may be serving from its local share without
/// Redis: its share, ⌊limit / N⌋ of every window with its own N, is kept
/// back until its reservation ends (see [`SharedBudgets::heartbeat`]). A
/// learned limit below the given one replaces it. Returns {admitted
/// (1-based, 0 = none, -1 = a calendar window ended: recompute), wait µs
/// (-1 = all disabled), now µs, lost, suspects, epoch, recovering}.
const ADMIT: &str = r"
local rid, slack, defn, hold, expected = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tokens = tonumber(ARGV[6])
if now < epoch + hold and redis.call('SCARD', KEYS[6]) < expected then
  return {0, math.min(epoch + hold - now, 25000), now, lost, 0, epoch, 1}
end
local shares = {}
if defn > 0 then
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. s(now))
  for i, m in ipairs(lapsed) do
    local n = tonumber(redis.call('HGET', KEYS[5], m) or '0') or 0
    if n < 1 then n = defn end
    shares[i] = n
  end
end
local function amount(member)
  return tonumber(string.match(member, ':(%d+)$') or '0')
end
local a, k, j, wait = 7, 8, 0, -1
while a <= #ARGV do
  j = j + 1
  local id, n = ARGV[a], tonumber(ARGV[a + 1])
  a = a + 2
  local w = nil
  if redis.call('HEXISTS', KEYS[2], id) == 0 then
    local until_us = tonumber(redis.call('HGET', KEYS[1], id) or '0')
    if until_us > now then
      w = until_us - now
    else
      local need = 0
      local limits = {}
      for i = 0, n - 1 do
        local kind, p1, p2, limit = tonumber(ARGV[a + 4 * i]), tonumber(ARGV[a + 4 * i + 1]), tonumber(ARGV[a + 4 * i + 2]), tonumber(ARGV[a + 4 * i + 3])
        local log = KEYS[k + i]
        local learned = tonumber(redis.call('HGET', KEYS[7], log) or '0') or 0
        if learned > 0 and learned < limit then limit = learned end
        limits[i] = limit
        local room = limit
        for _, sn in ipairs(shares) do room = room - math.floor(limit / sn) end
        if kind == 2 then
          redis.call('ZREMRANGEBYSCORE', log, '-inf', s(now))
          if redis.call('ZCARD', log) >= room then need = math.max(need, 20000) end
        elseif p2 > 0 then
          -- A calendar window [p1, p2): a counter named by its end. Redis's
          -- clock outside it (a replica's clock on the other side of a
          -- reset): recompute, nothing charged.
          if now >= p2 or now < p1 then return {-1, 0, now, lost, #shares, epoch, 0} end
          if tonumber(redis.call('GET', log) or '0') >= room then need = math.max(need, p2 - now) end
        elseif kind == 1 then
          redis.call('ZREMRANGEBYSCORE', log, '-inf', s(now - p1))
          local e = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
          local sum, settled = 0, 0
          for x = 1, #e, 2 do
            local n = amount(e[x])
            sum = sum + n
            if not string.find(e[x], ':R:', 1, true) then settled = settled + n end
          end
          if sum >= room and settled < room then
            -- Reservations of requests still running fill it: one of them
            -- settling (to its use) may make room any moment.
            need = math.max(need, 20000)
          elseif sum >= room then
            if room < 1 then
              need = math.max(need, p1)
            else
              for x = 1, #e, 2 do
                sum = sum - amount(e[x])
                if sum < room then
                  need = math.max(need, tonumber(e[x + 1]) + p1 - now)
                  break
                end
              end
            end
          end
        else
          redis.call('ZREMRANGEBYSCORE', log, '-inf', s(now - p1))
          local count = redis.call('ZCARD', log)
          if count >= room then
            if room < 1 then
              need = math.max(need, p1)
            else
              local e = redis.call('ZRANGE', log, count - room, count - room, 'WITHSCORES')
              need = math.max(need, tonumber(e[2]) + p1 - now)
            end
          end
        end
      end
      if need == 0 then
        for i = 0, n - 1 do
          local kind, p1, p2, log = tonumber(ARGV[a + 4 * i]), tonumber(ARGV[a + 4 * i + 1]), tonumber(ARGV[a + 4 * i + 2]), KEYS[k + i]
          local reserve = math.min(tokens, limits[i])
          if kind == 2 then
            redis.call('ZADD', log, s(now + p1), rid)
            redis.call('PEXPIRE', log, math.floor(p1 / 1000) + slack)
          elseif p2 > 0 then
            if kind == 1 then redis.call('INCRBY', log, reserve) else redis.call('INCR', log) end
            redis.call('PEXPIREAT', log, math.floor(p2 / 1000) + slack)
          else
            if kind == 1 then
              redis.call('ZADD', log, s(now), rid .. ':R:' .. reserve)
            else
              redis.call('ZADD', log, s(now), rid)
            end
            redis.call('PEXPIRE', log, math.floor(p1 / 1000) + slack)
          end
        end
        return {j, 0, now, lost, #shares, epoch, 0}
      end
      w = need
    end
  end
  if w ~= nil and (wait < 0 or w < wait) then wait = w end
  a = a + 4 * n
  k = k + n
end
return {0, wait, now, lost, #shares, epoch, 0}
";

/// Settles an admitted request: KEYS 1 learned limits, then its token and
/// concurrency windows; ARGV request id, reserved, used, then per window:
/// kind, calendar end (0: rolling), limit. A token reservation becomes the
/// use, counted from now (when the upstream counted it: at the answer, as
/// the local engine does), and a concurrency slot is freed.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local rid, reserved, used = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 2, #KEYS do
  local b = 4 + (i - 2) * 3
  local kind, p2, limit = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  local learned = tonumber(redis.call('HGET', KEYS[1], KEYS[i]) or '0') or 0
  if learned > 0 and learned < limit then limit = learned end
  local r = math.min(reserved, limit)
  if kind == 2 then
    redis.call('ZREM', KEYS[i], rid)
  elseif p2 > 0 then
    if redis.call('EXISTS', KEYS[i]) == 1 and used ~= r then redis.call('INCRBY', KEYS[i], used - r) end
  else
    -- Found by its prefix: the limit (so the clamp) may have changed since.
    local prefix = rid .. ':R:'
    for _, m in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
      if string.sub(m, 1, #prefix) == prefix then
        redis.call('ZREM', KEYS[i], m)
        redis.call('ZADD', KEYS[i], now, rid .. ':' .. used)
        break
      end
    end
  end
end
return 1
";

/// Heartbeat (after [`EPOCH`]). KEYS 1 (unused), 2 (unused), 3 epoch, 4
/// members, 5 member shares, 6 replayed; ARGV 1 replica, 2 lease µs, 3
/// reservation µs (how long after its lease lapsed a vanished replica's
/// share stays kept back), 4 this replica's N, 5 a deadline µs on Redis's
/// clock (0: none) past which nothing is renewed (a call that sat in a
/// frozen Redis). Returns {live members, suspects, epoch, now, replayed},
/// or {-1} past the deadline.
const BEAT: &str = r"
if tonumber(ARGV[5]) > 0 and now > tonumber(ARGV[5]) then return {-1, 0, epoch, now, 0} end
local gone = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', '(' .. s(now - tonumber(ARGV[3])))
for _, m in ipairs(gone) do
  redis.call('ZREM', KEYS[4], m)
  redis.call('HDEL', KEYS[5], m)
end
local ttl = math.floor((tonumber(ARGV[2]) + tonumber(ARGV[3])) / 1000) + 1000
redis.call('ZADD', KEYS[4], s(now + tonumber(ARGV[2])), ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[4], ttl)
redis.call('PEXPIRE', KEYS[5], ttl)
local live = redis.call('ZCOUNT', KEYS[4], s(now), '+inf')
local suspects = redis.call('ZCOUNT', KEYS[4], '-inf', '(' .. s(now))
return {live, suspects, epoch, now, redis.call('SISMEMBER', KEYS[6], ARGV[1])}
";

/// Marks a replica as having replayed into an epoch (only if it is still
/// the pool's): KEYS 3 epoch, 6 replayed; ARGV 1 replica, 2 epoch. The set
/// lives as long as the epoch (a new epoch empties it): a replica replays
/// once per epoch, never again because a mark expired.
const REPLAYED: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[2] then return 0 end
redis.call('SADD', KEYS[6], ARGV[1])
return 1
";

/// Records admissions made elsewhere (a replica's local share while Redis
/// was away, or every admission of the last window after Redis lost its
/// state): KEYS 1 log; ARGV period µs, calendar end µs (0: rolling), then
/// for a rolling log member, score µs pairs, for a calendar counter the
/// count. Returns the log's size (or the counter).
const REPLAY: &str = r"
local p, e = tonumber(ARGV[1]), tonumber(ARGV[2])
if e > 0 then
  local c = redis.call('INCRBY', KEYS[1], tonumber(ARGV[3]))
  redis.call('PEXPIREAT', KEYS[1], math.floor(e / 1000) + 1000)
  return c
end
for i = 3, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.floor(p / 1000) + 1000)
return redis.call('ZCARD', KEYS[1])
";

/// Sets a cooldown's end, never shortening one: KEYS 1 cooldowns; ARGV id,
/// duration µs, hash TTL ms. Returns the end in force.
const COOL: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local target = now + tonumber(ARGV[2])
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if old > target then target = old end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', target))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return target
";

/// How long the cooldown hash lives after its last write (Redis 7.0 has no
/// per-field expiry; a day covers any cooldown).
const HEALTH_TTL: Duration = Duration::from_secs(24 * 3600);

/// Budgets of one deployment in one Redis.
#[derive(Clone)]
pub struct SharedBudgets {
    conn: ConnectionManager,
    admit: Script,
    cool: Script,
    beat: Script,
    replay: Script,
    replayed: Script,
    settle: Script,
    config: SharedConfig,
    /// This replica's N: the replicas it counts (its share is ⌊limit / N⌋),
    /// also assumed for a suspect that recorded none. 0: no shares kept back.
    replicas: Arc<AtomicU64>,
    /// How long after a pool's state was lost admissions wait for every
    /// expected replica's replay (µs).
    hold_us: Arc<AtomicU64>,
    /// Replays expected after a state loss (the replicas last seen).
    expected: Arc<AtomicU64>,
    /// Makes request ids unique across replicas and calls.
    replica: String,
    counter: Arc<AtomicU64>,
}

impl std::fmt::Debug for SharedBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBudgets")
            .field("config", &self.config)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl SharedBudgets {
    /// Connects (one multiplexed connection that reconnects by itself,
    /// calls bounded by `config.timeout`).
    ///
    /// # Errors
    /// A URL that is not Redis's, or no connection within a second.
    pub async fn connect(config: SharedConfig) -> Result<Self, SharedError> {
        let conn = connect_manager(&config).await?;
        let replica = format!("{:x}-{:x}", std::process::id(), now_nanos());
        Ok(Self {
            conn,
            admit: Script::new(&format!("{EPOCH}{ADMIT}")),
            cool: Script::new(COOL),
            beat: Script::new(&format!("{EPOCH}{BEAT}")),
            replay: Script::new(REPLAY),
            replayed: Script::new(REPLAYED),
            settle: Script::new(SETTLE),
            config,
            replicas: Arc::new(AtomicU64::new(0)),
            hold_us: Arc::new(AtomicU64::new(0)),
            expected: Arc::new(AtomicU64::new(0)),
            replica,
            counter: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The same connection, counting `replicas` replicas (see
    /// [`set_replicas`](Self::set_replicas)).
    pub fn with_replicas(self, replicas: u64) -> Self {
        self.set_replicas(replicas);
        self
    }

    /// This replica counts `replicas` replicas: the share it takes without
    /// Redis is ⌊limit / replicas⌋, which [`heartbeat`](Self::heartbeat)
    /// records, so that the others keep exactly that back while its lease
    /// lapsed; also the number of replays expected after a state loss (see
    /// [`set_expected_replays`](Self::set_expected_replays)). 0: keep nothing
    /// back (a lone replica).
    pub fn set_replicas(&self, replicas: u64) {
        self.replicas.store(replicas, Ordering::Relaxed);
        self.expected.store(replicas, Ordering::Relaxed);
    }

    /// After a state loss, admissions wait (up to the recovery hold) until
    /// `replicas` replicas replayed: the replicas that were serving before.
    pub fn set_expected_replays(&self, replicas: u64) {
        self.expected.store(replicas, Ordering::Relaxed);
    }

    /// After a pool's state was lost, admissions wait up to `hold` for every
    /// expected replica to replay what it sent (the longest window: after
    /// it, nothing sent before the loss counts any more).
    pub fn set_recovery_hold(&self, hold: Duration) {
        self.hold_us.store(micros(hold), Ordering::Relaxed);
    }

    /// This replica's name in the pool's membership.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The six keys every admit and heartbeat script of `pool` reads.
    fn pool_keys(&self, invocation: &mut redis::ScriptInvocation<'_>, pool: &str) {
        invocation
            .key(self.key(pool, "cool"))
            .key(self.key(pool, "dis"))
            .key(self.key(pool, "epoch"))
            .key(self.key(pool, "mem"))
            .key(self.key(pool, "memn"))
            .key(self.key(pool, "rep"))
            .key(self.key(pool, "lim"));
    }

    /// Renews this replica's lease in `pool` for `lease` (recording its N),
    /// forgets members whose lease lapsed more than `reservation` ago, and
    /// says who serves and which epoch the pool's state is in.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn heartbeat(
        &self,
        pool: &str,
        lease: Duration,
        reservation: Duration,
    ) -> Result<Membership, SharedError> {
        self.heartbeat_until(pool, lease, reservation, 0).await
    }

    /// [`heartbeat`](Self::heartbeat) that renews nothing if Redis runs it
    /// after `deadline_us` (its own clock; 0: no deadline): answered as a
    /// [`SharedError::Timeout`].
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn heartbeat_until(
        &self,
        pool: &str,
        lease: Duration,
        reservation: Duration,
        deadline_us: u64,
    ) -> Result<Membership, SharedError> {
        check_name("pool", pool)?;
        let mut invocation = self.beat.prepare_invoke();
        self.pool_keys(&mut invocation, pool);
        invocation
            .arg(&self.replica)
            .arg(micros(lease))
            .arg(micros(reservation))
            .arg(self.replicas.load(Ordering::Relaxed))
            .arg(deadline_us);
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let [live, suspects, epoch, now_us, replayed] = reply[..] else {
            return Err(SharedError::Reply(format!("{reply:?}")));
        };
        if live < 0 {
            return Err(SharedError::Timeout(self.config.timeout));
        }
        Ok(Membership {
            live: live.unsigned_abs(),
            suspects: suspects.unsigned_abs(),
            epoch: epoch.unsigned_abs(),
            now_us: now_us.unsigned_abs(),
            replayed: replayed == 1,
        })
    }

    /// Records that this replica replayed what it sent into `pool`'s state
    /// of `epoch`; `false` when the pool is in another epoch by now (replay
    /// into that one).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn replayed(&self, pool: &str, epoch: u64) -> Result<bool, SharedError> {
        check_name("pool", pool)?;
        let mut invocation = self.replayed.prepare_invoke();
        self.pool_keys(&mut invocation, pool);
        invocation
            .arg(&self.replica)
            .arg(epoch)
            .arg(u64::try_from(HEALTH_TTL.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.conn.clone();
        let done: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(done == 1)
    }

    /// Leaves `pool` gracefully (at shutdown): no share is kept back for it.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn leave(&self, pool: &str) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().zrem(self.key(pool, "mem"), &self.replica).hdel(self.key(pool, "memn"), &self.replica);
        let _: (i64, i64) = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Writes admissions this replica made without Redis (at `times_us`,
    /// Redis's clock) into `window` of candidate `id` in `pool`, so that the
    /// shared window counts them: members of a rolling log, or their number
    /// added to a calendar counter.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn replay(
        &self,
        pool: &str,
        id: &str,
        window: Window<'_>,
        times_us: &[u64],
    ) -> Result<u64, SharedError> {
        let entries: Vec<(u64, u64)> = times_us.iter().map(|t| (*t, 1)).collect();
        self.replay_entries(pool, id, window, &entries).await
    }

    /// [`replay`](Self::replay) of `(time µs, amount)` entries: an amount of
    /// requests (one member each) or of tokens (one member carrying them).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn replay_entries(
        &self,
        pool: &str,
        id: &str,
        window: Window<'_>,
        entries: &[(u64, u64)],
    ) -> Result<u64, SharedError> {
        check_name("pool", pool)?;
        check_name("id", id)?;
        check_name("window", window.name)?;
        let mut invocation = self.replay.prepare_invoke();
        invocation.key(self.log_key(pool, id, &window)).arg(micros(window.period));
        match window.calendar {
            Some((_, end)) => {
                invocation.arg(end).arg(entries.iter().map(|(_, n)| *n).sum::<u64>());
            }
            None => {
                invocation.arg(0u64);
                let mut i = 0usize;
                for &(t, amount) in entries {
                    match window.kind {
                        Kind::Tokens => {
                            invocation.arg(format!("{}-replay-{i}-{t}:{amount}", self.replica)).arg(t);
                            i += 1;
                        }
                        _ => {
                            for _ in 0..amount {
                                invocation.arg(format!("{}-replay-{i}-{t}", self.replica)).arg(t);
                                i += 1;
                            }
                        }
                    }
                }
            }
        }
        let mut conn = self.conn.clone();
        self.bounded(invocation.invoke_async(&mut conn)).await
    }

    /// The Redis key of `what` in `pool`: `<prefix>:{<pool>}:<what>`.
    fn key(&self, pool: &str, what: &str) -> String {
        format!("{}:{{{pool}}}:{what}", self.config.key_prefix)
    }

    /// The Redis key of candidate `id`'s `window`: `log:<budget>:<name>`, and
    /// `:<end>` for a calendar window.
    fn log_key(&self, pool: &str, id: &str, window: &Window<'_>) -> String {
        let budget = window.budget.unwrap_or(id);
        match window.calendar {
            None => self.key(pool, &format!("log:{budget}:{}", window.name)),
            Some((_, end)) => self.key(pool, &format!("log:{budget}:{}:{end}", window.name)),
        }
    }

    /// Admits a request on the first candidate (in the given order: the
    /// replica's round robin) that is not disabled, not cooling down and
    /// has room in every window, charging each of its windows; or says how
    /// long until one might. One round trip.
    ///
    /// # Errors
    /// No answer within the deadline, or a Redis error; the caller decides
    /// what to do without Redis.
    pub async fn admit(&self, pool: &str, candidates: &[Candidate<'_>]) -> Result<Admission, SharedError> {
        self.admit_reserving(pool, candidates, 0).await
    }

    /// [`admit`](Self::admit) for a request that reserves `tokens` in the
    /// token windows of the key it gets (at most each window's limit).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn admit_reserving(
        &self,
        pool: &str,
        candidates: &[Candidate<'_>],
        tokens: u64,
    ) -> Result<Admission, SharedError> {
        check_name("pool", pool)?;
        let mut invocation = self.admit.prepare_invoke();
        self.pool_keys(&mut invocation, pool);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let replicas = self.replicas.load(Ordering::Relaxed);
        invocation
            .arg(format!("{}-{n:x}", self.replica))
            .arg(1_000u64)
            .arg(replicas)
            .arg(self.hold_us.load(Ordering::Relaxed))
            .arg(self.expected.load(Ordering::Relaxed))
            .arg(tokens);
        for c in candidates {
            check_name("id", c.id)?;
            invocation.arg(c.id).arg(c.windows.len());
            for w in c.windows {
                check_name("window", w.name)?;
                if let Some(budget) = w.budget {
                    check_name("budget", budget)?;
                }
                invocation.key(self.log_key(pool, c.id, w));
                invocation.arg(kind_code(w.kind));
                match w.calendar {
                    None => invocation.arg(micros(w.period)).arg(0u64),
                    Some((start, end)) => invocation.arg(start).arg(end.max(start + 1)),
                };
                invocation.arg(w.limit);
            }
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self.bounded(invocation.invoke_async(&mut conn)).await?;
        let [admitted, wait, now, lost, suspects, epoch, recovering] = reply[..] else {
            return Err(SharedError::Reply(format!("{reply:?}")));
        };
        if admitted < 0 {
            return Err(SharedError::StaleCalendar { now_us: now.unsigned_abs() });
        }
        let admitted = usize::try_from(admitted).ok().and_then(|j| j.checked_sub(1));
        let wait = match (admitted, wait) {
            (Some(_), _) => Some(Duration::ZERO),
            (None, w) if w < 0 => None,
            (None, w) => Some(Duration::from_micros(w.unsigned_abs())),
        };
        Ok(Admission {
            admitted,
            wait,
            now_us: now.unsigned_abs(),
            state_lost: lost == 1,
            suspects: suspects.unsigned_abs(),
            epoch: epoch.unsigned_abs(),
            recovering: recovering == 1,
            request: n,
        })
    }

    /// Settles admission `request` of candidate `id`, whose token and
    /// concurrency `windows` it charged: its reservation of `reserved`
    /// tokens becomes `used`, its concurrency slot is freed. Windows of other
    /// kinds are ignored.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn settle(
        &self,
        pool: &str,
        id: &str,
        windows: &[Window<'_>],
        request: u64,
        reserved: u64,
        used: u64,
    ) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        let mut invocation = self.settle.prepare_invoke();
        invocation
            .key(self.key(pool, "lim"))
            .arg(format!("{}-{request:x}", self.replica))
            .arg(reserved)
            .arg(used);
        let mut any = false;
        for w in windows.iter().filter(|w| w.kind != Kind::Requests) {
            invocation.key(self.log_key(pool, id, w));
            invocation.arg(kind_code(w.kind)).arg(w.calendar.map_or(0, |(_, end)| end)).arg(w.limit);
            any = true;
        }
        if !any {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// A limit the upstream announced for `window` of candidate `id` (lower
    /// than the configured one): every replica's admissions use it.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn learn(
        &self,
        pool: &str,
        id: &str,
        window: &Window<'_>,
        limit: u64,
    ) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        let lim = self.key(pool, "lim");
        pipe.atomic()
            .hset(&lim, self.log_key(pool, id, window), limit)
            .ignore()
            .pexpire(&lim, i64::try_from(HEALTH_TTL.as_millis()).unwrap_or(i64::MAX))
            .ignore();
        let _: () = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Key `id` of `pool` rests `duration` from now (Redis's clock), or
    /// longer if it already does: every replica skips it until then.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn cool_down(&self, pool: &str, id: &str, duration: Duration) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        check_name("id", id)?;
        let mut invocation = self.cool.prepare_invoke();
        invocation
            .key(self.key(pool, "cool"))
            .arg(id)
            .arg(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX))
            .arg(u64::try_from(HEALTH_TTL.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.conn.clone();
        let _: i64 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Key `id` of `pool` is disabled (the upstream rejected it) for every
    /// replica, until [`enable`](Self::enable).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn disable(&self, pool: &str, id: &str) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        check_name("id", id)?;
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HSET").arg(self.key(pool, "dis")).arg(id).arg(now_nanos() / 1_000).to_owned();
        let _: i64 = self.bounded(cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Every key health `pool` holds: cooldowns as (id, until µs) and the
    /// disabled ids, with Redis's clock; so a replica's own pool can mirror
    /// them (and keep them while Redis is away).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn health(&self, pool: &str) -> Result<Health, SharedError> {
        check_name("pool", pool)?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.key(pool, "cool")).cmd("HKEYS").arg(self.key(pool, "dis")).cmd("TIME");
        type Reply = (Vec<(String, u64)>, Vec<String>, (u64, u64));
        let (cool, disabled, time): Reply = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(Health { cooling: cool, disabled, now_us: time.0 * 1_000_000 + time.1 })
    }

    /// Clears key `id`'s disabled state and cooldown in `pool` (an
    /// operator's reset).
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn enable(&self, pool: &str, id: &str) -> Result<(), SharedError> {
        check_name("pool", pool)?;
        check_name("id", id)?;
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().hdel(self.key(pool, "dis"), id).hdel(self.key(pool, "cool"), id);
        let _: (i64, i64) = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Redis's memory for one key's log in `pool` (`MEMORY USAGE`), in bytes.
    ///
    /// # Errors
    /// As [`admit`](Self::admit).
    pub async fn memory_usage(&self, pool: &str, id: &str, window: &str) -> Result<Option<u64>, SharedError> {
        let mut conn = self.conn.clone();
        let cmd =
            redis::cmd("MEMORY").arg("USAGE").arg(self.key(pool, &format!("log:{id}:{window}"))).to_owned();
        self.bounded(cmd.query_async(&mut conn)).await
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        bounded(self.config.timeout, call).await
    }
}

/// One multiplexed connection to `config.url` that reconnects by itself,
/// each answer awaited at most `config.timeout` (TLS through rustls' ring
/// provider, with `config.ca_pem` when given); after checking
/// `config.key_prefix`.
async fn connect_manager(config: &SharedConfig) -> Result<ConnectionManager, SharedError> {
    if config.key_prefix.contains(['{', '}']) || config.key_prefix.is_empty() {
        return Err(SharedError::Invalid(format!(
            "shared.key_prefix: {:?} must be non-empty, without '{{' or '}}' (the hash tag is the pool's)",
            config.key_prefix
        )));
    }
    let url_error = |e: redis::RedisError| SharedError::Url {
        reason: format!("{} is not a usable Redis URL ({})", redacted(&config.url), e.category()),
    };
    // redis-rs asks rustls for the process's provider: ring, as the
    // upstream client uses (a no-op when one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match &config.ca_pem {
        Some(pem) => Client::build_with_tls(
            config.url.as_str(),
            redis::TlsCertificates { client_tls: None, root_cert: Some(pem.clone()) },
        )
        .map_err(url_error)?,
        None => Client::open(config.url.as_str()).map_err(url_error)?,
    };
    let manager = ConnectionManagerConfig::new()
        .set_response_timeout(Some(config.timeout))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1);
    tokio::time::timeout(Duration::from_secs(2), ConnectionManager::new_with_config(client, manager))
        .await
        .map_err(|_| SharedError::Timeout(Duration::from_secs(2)))?
        .map_err(SharedError::from)
}

/// `call`, given at most `timeout`.
async fn bounded<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, SharedError> {
    match tokio::time::timeout(timeout, call).await {
        // The connection manager's own response timeout (the same deadline).
        Ok(Err(e)) if e.is_timeout() => Err(SharedError::Timeout(timeout)),
        Ok(answer) => Ok(answer?),
        Err(_) => Err(SharedError::Timeout(timeout)),
    }
}

/// Names that go into Redis keys: no hash-tag braces, no separators, no
/// spaces (fingerprints such as `sha256:…` keep their colon).
fn check_name(what: &str, name: &str) -> Result<(), SharedError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '*');
    if name.is_empty() || !name.chars().all(fine) {
        return Err(SharedError::Invalid(format!("{what} {name:?} cannot be part of a Redis key")));
    }
    Ok(())
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Requests => 0,
        Kind::Tokens => 1,
        Kind::Concurrency => 2,
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(redacted("redis://:s3cret@10.0.0.1:6379/0"), "redis://:…@10.0.0.1:6379/0");
        assert_eq!(redacted("rediss://app:s3cret@host/1"), "rediss://app:…@host/1");
        assert_eq!(redacted("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(
            redacted("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=…"
        );
        let config = SharedConfig::new("redis://:s3cret@host:6379");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn names_that_would_break_a_key_are_refused() {
        assert!(check_name("id", "sha256:0123abcd").is_ok());
        assert!(check_name("pool", "groq/*").is_ok());
        for bad in ["", "a b", "{tag}", "x\n"] {
            assert!(check_name("id", bad).is_err(), "{bad:?}");
        }
    }
}
