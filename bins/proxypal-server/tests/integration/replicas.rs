//! Three real `proxypal-server` processes sharing one quota through a real
//! `redis-server` of the test's own, in front of the simulated upstream in
//! rolling-window mode (60 per 6 s per key: NVIDIA's minute scaled by 10).
//! Checked from the upstream's own log: no 429, never more than 60 in any
//! 6 s of any key, through steady load, `SCRIPT FLUSH`, Redis killed and
//! restarted empty, and Redis frozen; a key one replica saw rejected is not
//! tried by the others. A control run without `shared` must overshoot.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proxypal_nim_sim::{SimConfig, SimHandle, SimRateLimit, SimServer};
use proxypal_shared::testing::Redis;

use crate::common::{chat_request, http_client, send};
use crate::hardening_support::{Binary, TempDir, get_request};

/// One multi-process test at a time: two at once on a 2-core machine push
/// the decision-to-arrival jitter past the 50 ms margin.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WINDOW: Duration = Duration::from_secs(6);
const LIMIT: u32 = 60;
const KEYS: usize = 4;
const FORBIDDEN: &str = "nvapi-replicas-test-forbidden-000000000000";

fn keys() -> Vec<String> {
    (0..KEYS).map(|i| format!("nvapi-replicas-test-{i:024}")).collect()
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// One replica's config: the sim's four keys and one it rejects, 60 per 6 s
/// (+ 50 ms margin) per key, a 3 s queue, Redis when given.
fn config(addr: SocketAddr, sim: &SimHandle, redis: Option<&str>) -> String {
    let mut keys: Vec<String> = keys();
    keys.push(FORBIDDEN.to_owned());
    let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
    let mut yaml = format!(
        "listen: {addr}\nworkers: 1\nupstream:\n  base_url: {}\nkeys: [{}]\nrate_limit:\n  requests_per_minute: 1000000\n  margin: 50ms\n  windows: [{{requests: {LIMIT}, per: 6s}}]\nretry:\n  queue_timeout: 3s\nstate:\n  path: null\nlog:\n  level: info\n",
        sim.base_url(),
        keys.join(", ")
    );
    if let Some(redis) = redis {
        yaml.push_str(&format!(
            "shared:\n  redis_url: {redis}\n  timeout: 200ms\n  lease: 300ms\n  heartbeat: 100ms\n  replicas: 3\n"
        ));
    }
    yaml
}

/// Three replicas; replica `i` reaches Redis at `redis[i]` (none: no `shared`).
/// A replica's config over one `key` of `sim` with `limits` (lines under
/// `rate_limit:`), sharing through `redis`.
fn one_key_replica(
    addr: SocketAddr,
    sim: &SimHandle,
    key: &str,
    limits: &str,
    queue: &str,
    redis: &Redis,
) -> String {
    format!(
        "listen: {addr}\nworkers: 1\nupstream:\n  base_url: {}\nkeys: [\"{key}\"]\nrate_limit:\n{limits}retry:\n  queue_timeout: {queue}\nstate:\n  path: null\nshared:\n  redis_url: {}\n  timeout: 200ms\n  lease: 300ms\n  heartbeat: 100ms\n  replicas: 2\n",
        sim.base_url(),
        redis.url()
    )
}

async fn replicas(dir: &Path, sim: &SimHandle, redis: &[String]) -> Vec<Binary> {
    let mut out = Vec::new();
    for i in 0..3 {
        let addr = free_addr();
        let path = dir.join(format!("replica-{i}.yaml"));
        std::fs::write(&path, config(addr, sim, redis.get(i).map(String::as_str))).unwrap();
        out.push(Binary::start(&path, addr).await);
    }
    out
}

/// Clients sending chat requests to every replica, back to back, for `for_`:
/// the statuses they saw.
async fn load(replicas: &[Binary], per_replica: usize, for_: Duration) -> BTreeMap<u16, usize> {
    let end = Instant::now() + for_;
    let mut tasks = Vec::new();
    for r in replicas {
        for _ in 0..per_replica {
            let addr = r.addr;
            tasks.push(tokio::spawn(async move {
                let http = http_client();
                let mut seen = Vec::new();
                while Instant::now() < end {
                    let reply = send(&http, chat_request(addr, false, &[])).await;
                    seen.push(reply.status.as_u16());
                }
                seen
            }));
        }
    }
    let mut statuses = BTreeMap::new();
    for t in tasks {
        for s in t.await.unwrap() {
            *statuses.entry(s).or_insert(0) += 1;
        }
    }
    statuses
}

/// How many accepts each key's log holds now.
fn accepted(sim: &SimHandle) -> BTreeMap<String, usize> {
    sim.stats().accept_log.iter().map(|(k, log)| (k.clone(), log.len())).collect()
}

fn rate_limited(sim: &SimHandle) -> u64 {
    sim.stats().per_key.values().map(|k| k.rate_limited).sum()
}

/// What the upstream saw in the worst 6 s of each key.
fn worst_windows(sim: &SimHandle) -> Vec<usize> {
    let stats = sim.stats();
    keys().iter().map(|k| stats.max_in_any_window(k, WINDOW)).collect()
}

fn sim() -> SimHandle {
    let config = SimConfig::fast()
        .with_keys(keys())
        .with_forbidden_keys([FORBIDDEN])
        .with_rate_limit(SimRateLimit::RollingWindow { limit: LIMIT, window: WINDOW });
    SimServer::start(SimConfig { record_accepts: true, ..config }).unwrap()
}

async fn quota_mode(replica: &Binary) -> String {
    let reply = send(&http_client(), get_request(replica.addr, "/health")).await;
    reply.json()["quota"]["mode"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_quota_through_redis_and_its_outages() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(mut redis) = Redis::start("three_replicas_share_one_quota_through_redis_and_its_outages") else {
        return;
    };
    let dir = TempDir::new("replicas");

    // Control: without `shared`, three replicas send three times the quota.
    let control_sim = sim();
    let control = replicas(&dir.0, &control_sim, &[]).await;
    load(&control, 4, Duration::from_secs(3)).await;
    let overshoot = rate_limited(&control_sim);
    assert!(overshoot > 0, "the control run must show the overshoot the shared quota prevents");
    drop(control);

    let sim = sim();
    // Replica 0 reaches Redis through a relay the test can pause or cut.
    let relay = Relay::start(redis.port).await;
    let urls = [format!("redis://127.0.0.1:{}/0", relay.port), redis.url(), redis.url()];
    let shared = replicas(&dir.0, &sim, &urls).await;
    for r in &shared {
        assert_eq!(quota_mode(r).await, "shared", "{}", r.log());
    }

    // Health: replica 0 meets the rejected key once; the others never try it.
    let http = http_client();
    for _ in 0..=KEYS {
        assert_eq!(send(&http, chat_request(shared[0].addr, false, &[])).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Steady: two windows of saturating load from the start of fresh windows.
    let before = accepted(&sim);
    let statuses = load(&shared, 4, 2 * WINDOW).await;
    // Counted on the upstream's clock, from the phase's first accept, over two
    // windows less a tenth of a second: both bursts, not the third (which the
    // clients still queued at the end would add unevenly).
    let stats = sim.stats();
    let fresh =
        |k: &String| stats.accept_log.get(k).map_or(&[][..], |log| &log[*before.get(k).unwrap_or(&0)..]);
    let t0 = keys().iter().filter_map(|k| fresh(k).first().copied()).min().unwrap();
    let span = 2 * WINDOW - Duration::from_millis(100);
    let per_key: Vec<usize> =
        keys().iter().map(|k| fresh(k).iter().filter(|t| **t >= t0 && **t < t0 + span).count()).collect();
    let used: usize = per_key.iter().sum();
    let ideal = KEYS * LIMIT as usize * 2;
    assert!(
        used * 100 >= ideal * 98,
        "≥ 98 % of the quota used: {used} of {ideal} ({per_key:?}, {statuses:?})"
    );
    let mean = used as f64 / KEYS as f64;
    for n in &per_key {
        assert!((*n as f64 - mean).abs() <= mean * 0.02, "per-key spread within ±2 %: {per_key:?}");
    }
    assert_eq!(rate_limited(&sim), 0, "no upstream 429 in the steady phase");
    assert_eq!(sim.stats().key(FORBIDDEN).requests, 1, "the rejected key was tried once, by one replica");

    // SCRIPT FLUSH under load: reloaded on NOSCRIPT, no client sees an error.
    let flushing = {
        let port = redis.port;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "SCRIPT", "FLUSH"])
                .output()
        })
    };
    let statuses = load(&shared, 3, Duration::from_secs(3)).await;
    assert!(flushing.await.unwrap().unwrap().status.success());
    assert!(statuses.keys().all(|s| *s == 200 || *s == 429), "{statuses:?}");

    // Redis killed: every replica degrades to its share, after a cautious start.
    redis.kill();
    let degraded = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (addr, degraded) = (shared[0].addr, Arc::clone(&degraded));
        tokio::spawn(async move {
            for _ in 0..40 {
                let reply = send(&http_client(), get_request(addr, "/health")).await;
                if reply.json()["quota"]["mode"] == "degraded" {
                    degraded.store(true, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let outage = load(&shared, 3, Duration::from_secs(10)).await;
    watcher.await.unwrap();
    assert!(degraded.load(Ordering::Relaxed), "/health says degraded while Redis is away");
    assert!(outage.get(&200).copied().unwrap_or(0) > 0, "shares are served without Redis: {outage:?}");
    // Restarted empty: the replicas replay what they sent and share again.
    redis.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in &shared {
        while quota_mode(r).await != "shared" {
            assert!(Instant::now() < deadline, "back to shared after Redis returned: {}", r.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    load(&shared, 3, Duration::from_secs(6)).await;

    // Redis frozen past the deadline, then thawed.
    let freezing = {
        let port = redis.port;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let pid = std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "INFO", "server"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&pid.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("process_id:").map(|p| p.trim().to_owned()))
                .unwrap()
        })
    };
    let pid = freezing.await.unwrap();
    std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let frozen = tokio::spawn({
        let pid = pid.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        }
    });
    load(&shared, 3, Duration::from_secs(6)).await;
    frozen.await.unwrap();

    // Replica 0 cut off from Redis (bytes held, then connections dropped)
    // while the others keep it: they shrink to the rest before it spends.
    relay.set(HOLD);
    let cut = load(&shared, 3, Duration::from_secs(5)).await;
    assert_eq!(quota_mode(&shared[0]).await, "degraded");
    assert_eq!(quota_mode(&shared[1]).await, "shared");
    relay.set(DROP);
    let cut_more = load(&shared, 3, Duration::from_secs(5)).await;
    relay.set(PASS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while quota_mode(&shared[0]).await != "shared" {
        assert!(Instant::now() < deadline, "replica 0 rejoins: {}", shared[0].log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load(&shared, 3, Duration::from_secs(3)).await;
    assert!(cut.contains_key(&200) && cut_more.contains_key(&200), "{cut:?} {cut_more:?}");

    // Through every phase: the upstream never refused, no key ever over its window.
    assert_eq!(rate_limited(&sim), 0, "no upstream 429 in any phase");
    let worst = worst_windows(&sim);
    assert!(worst.iter().all(|n| *n <= LIMIT as usize), "never more than {LIMIT} in any 6 s: {worst:?}");
    assert_eq!(sim.stats().key(FORBIDDEN).requests, 1, "the rejected key stayed untried by the others");
    // Over the whole run, outages included, the keys served alike.
    let totals: Vec<usize> = keys().iter().map(|k| accepted(&sim).get(k).copied().unwrap_or(0)).collect();
    let mean = totals.iter().sum::<usize>() as f64 / KEYS as f64;
    for n in &totals {
        assert!(
            (*n as f64 - mean).abs() <= mean * 0.02,
            "per-key spread within ±2 % over every phase: {totals:?}"
        );
    }
    let logs: Vec<String> = shared.iter().map(Binary::log).collect();
    assert!(logs.iter().all(|l| l.contains("Redis is out of reach")), "an error on each switch: {logs:?}");
    assert!(logs.iter().all(|l| l.contains("Redis answers again")), "and a line on each return");
    for l in &logs {
        assert!(!l.contains(&keys()[0]), "no key in the logs");
    }
}

const PASS: u8 = 0;
const HOLD: u8 = 1;
const DROP: u8 = 2;

/// A TCP relay to Redis on a port of its own: passes bytes, holds them (a
/// partition that swallows packets), or drops every connection and refuses
/// new ones (a partition that resets them).
struct Relay {
    port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let task = tokio::spawn({
            let mode = Arc::clone(&mode);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else { return };
                    if mode.load(Ordering::Relaxed) == DROP {
                        continue; // closed at once
                    }
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, Arc::clone(&mode)));
                    tokio::spawn(pump(sr, cw, Arc::clone(&mode)));
                }
            }
        });
        Self { port, mode, task }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` while passing; holds the bytes while held; ends
/// (closing both) when dropped.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<std::sync::atomic::AtomicU8>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match mode.load(Ordering::Relaxed) {
            DROP => return,
            HOLD => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            _ => {}
        }
        let read = tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await;
        let n = match read {
            Err(_) => continue, // look at the mode again
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_token_windows_and_concurrency_slots() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(redis) = Redis::start("two_replicas_share_token_windows_and_concurrency_slots") else { return };
    let dir = TempDir::new("replicas-tokens");
    let key = "nvapi-replicas-tokens-0000000000000000000";
    // One key: 2 in flight at most, 2,000 tokens per 4 s; each answer uses
    // 100 completion tokens and holds its slot 150 ms.
    let config = SimConfig { record_accepts: true, ..SimConfig::fast() }
        .with_keys([key])
        .with_completion_tokens(100)
        .with_token_limit(2_000, Duration::from_secs(4))
        .with_max_concurrent(2)
        .with_processing_delay(Duration::from_millis(150));
    let sim = SimServer::start(config).unwrap();
    let mut replicas = Vec::new();
    for i in 0..2 {
        let addr = free_addr();
        let path = dir.path(&format!("replica-{i}.yaml"));
        let limits = "  requests_per_minute: 1000000\n  max_concurrent: 2\n  margin: 50ms\n  windows: [{tokens: 2000, per: 4s}]\n";
        let yaml = one_key_replica(addr, &sim, key, limits, "3s", &redis);
        std::fs::write(&path, yaml).unwrap();
        replicas.push(Binary::start(&path, addr).await);
    }
    let statuses = load(&replicas, 3, Duration::from_secs(6)).await;
    let stats = sim.stats();
    let key_stats = stats.key(key);
    assert_eq!(key_stats.rate_limited, 0, "no upstream 429 (tokens or slots): {statuses:?}");
    assert!(stats.max_in_flight <= 2, "never more than 2 in flight across replicas: {}", stats.max_in_flight);
    // Reservations settle to the use (about 130 tokens each), so far more
    // than two requests per window get through.
    assert!(key_stats.ok >= 20, "reservations were settled: {} served, {statuses:?}", key_stats.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_cap_is_one_count_for_all_replicas() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(redis) = Redis::start("a_daily_cap_is_one_count_for_all_replicas") else { return };
    let dir = TempDir::new("replicas-day");
    let key = "nvapi-replicas-daily-00000000000000000000";
    let sim =
        SimServer::start(SimConfig { record_accepts: true, ..SimConfig::fast() }.with_keys([key])).unwrap();
    let mut replicas = Vec::new();
    for i in 0..2 {
        let addr = free_addr();
        let path = dir.path(&format!("replica-{i}.yaml"));
        let limits = "  requests_per_minute: 1000\n  requests_per_day: 3\n  day_reset: \"00:00 America/Los_Angeles\"\n";
        let yaml = one_key_replica(addr, &sim, key, limits, "1s", &redis);
        std::fs::write(&path, yaml).unwrap();
        replicas.push(Binary::start(&path, addr).await);
    }
    let http = http_client();
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(send(&http, chat_request(replicas[i % 2].addr, false, &[])).await.status.as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "three in the day, from both: {statuses:?}"
    );
    assert_eq!(statuses[3], 429, "{statuses:?}");
    assert_eq!(sim.stats().key(key).requests, 3, "the upstream saw the day's three, no more");
    // One counter in Redis, named by the day's end in the provider's zone.
    let keys = redis.cli(&["KEYS", "proxypal:{default}:log:*:d86400:*"]).unwrap();
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert_eq!(redis.cli(&["GET", keys.trim()]).unwrap().trim(), "3");
}

// Named clients' own quotas, shared like key budgets: two in-process
// replicas in front of one simulator with room to spare, client alice with
// 4 requests per minute.

const ALICE: &str = "pp-alice-replicas-token-01";
const OPERATOR: &str = "pp-operator-replicas-token";

/// A replica with alice (4 per minute, and the `more` limits: YAML lines)
/// sharing quotas through `redis_url` with one other (lease 300 ms,
/// heartbeats every 100 ms), in front of `sim`.
async fn alice_replica(
    sim: &SimHandle,
    keys: &[String],
    redis_url: &str,
    more: &str,
) -> proxypal_server::Running {
    let mut config = crate::common::proxy_config(sim, keys);
    config.auth.tokens = vec![proxypal_server::config::Secret::new(OPERATOR)];
    let alice = format!("name: alice\ntoken: {ALICE}\nrequests_per_minute: 4\n{more}");
    config.clients = vec![yaml_serde::from_str(&alice).unwrap()];
    config.retry.queue_timeout = Duration::from_secs(1);
    let mut shared = proxypal_server::config::SharedConfig::default();
    shared.redis_url = redis_url.to_owned();
    shared.timeout = Duration::from_millis(200);
    shared.lease = Duration::from_millis(300);
    shared.heartbeat = Duration::from_millis(100);
    shared.replicas = 2;
    config.shared = Some(shared);
    proxypal_server::start(&config, false).await.unwrap()
}

/// Alice's chat request to `addr`: its status and error code (on success,
/// the tokens the answer reports).
async fn alice_chat(http: &crate::common::HttpClient, addr: SocketAddr) -> (u16, String) {
    let req = chat_request(addr, false, &[("authorization", &format!("Bearer {ALICE}"))]);
    let reply = send(http, req).await;
    let code = if reply.status.is_success() {
        reply.json()["usage"]["total_tokens"].to_string()
    } else {
        reply.error_code()
    };
    (reply.status.as_u16(), code)
}

async fn mode_of(addr: SocketAddr) -> String {
    let reply = send(&http_client(), get_request(addr, "/health")).await;
    reply.json()["quota"]["mode"].as_str().unwrap_or_default().to_owned()
}

/// Alice's requests taken by `addr`'s own engine, as its `/stats` shows them.
async fn alice_used_locally(addr: SocketAddr) -> u64 {
    let req = get_request(addr, "/stats");
    let (mut parts, body) = req.into_parts();
    parts.headers.insert("authorization", format!("Bearer {OPERATOR}").parse().unwrap());
    let stats = send(&http_client(), http::Request::from_parts(parts, body)).await.json();
    stats["clients"][0]["limits"][0]["used"].as_u64().unwrap_or(u64::MAX)
}

/// Alice's tokens per day, settled in Redis with each answer's use. (Not in
/// the degraded test: a day's window puts the cautious start a day away.)
const DAY: &str = "tokens_per_day: 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_clients_quota_is_one_budget_across_replicas() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(redis) = Redis::start("a_named_clients_quota_is_one_budget_across_replicas") else { return };
    let keys = proxypal_nim_sim::generate_test_keys(2);
    let sim = SimServer::start(SimConfig::fast().with_keys(keys.clone())).unwrap();
    let replicas = [
        alice_replica(&sim, &keys, &redis.url(), DAY).await,
        alice_replica(&sim, &keys, &redis.url(), DAY).await,
    ];
    for r in &replicas {
        assert_eq!(mode_of(r.addr()).await, "shared");
    }
    let http = http_client();
    let mut seen = Vec::new();
    for i in 0..8 {
        seen.push(alice_chat(&http, replicas[i % 2].addr()).await);
    }
    let ok = seen.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(ok, 4, "alice's 4 per minute across both replicas: {seen:?}");
    assert!(seen[..4].iter().all(|(s, _)| *s == 200), "the first four, from both: {seen:?}");
    assert!(
        seen[4..].iter().all(|(s, code)| *s == 429 && code == "client_quota_exceeded"),
        "then her own quota answers, on both: {seen:?}"
    );
    assert_eq!(sim.stats().total_requests, 4, "refused requests spent no upstream quota");
    // Alice's minute in Redis (her name hashed) holds the four.
    let minute = redis.cli(&["KEYS", "proxypal:{:clients}:log:client:*:r60000"]).unwrap();
    assert_eq!(minute.lines().count(), 1, "{minute}");
    assert_eq!(redis.cli(&["ZCARD", minute.trim()]).unwrap().trim(), "4");
    assert!(!minute.contains("alice"), "client names stay out of Redis keys: {minute}");
    // Her day of tokens holds each answer's reported use, not its estimate
    // (settled off the request's path: give it a moment).
    let used: u64 = seen[..4].iter().map(|(_, tokens)| tokens.parse::<u64>().unwrap()).sum();
    let day = redis.cli(&["KEYS", "proxypal:{:clients}:log:client:*:tr86400000"]).unwrap();
    let mut settled = 0;
    for _ in 0..50 {
        let members = redis.cli(&["ZRANGE", day.trim(), "0", "-1"]).unwrap();
        if members.lines().count() == 4 && !members.contains(":R:") {
            settled = members.lines().map(|m| m.rsplit(':').next().unwrap().parse::<u64>().unwrap()).sum();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(settled, used, "the day of tokens counts what the answers used ({day})");
    // Each replica's own engine holds what it sent (for /stats).
    for r in &replicas {
        assert_eq!(alice_used_locally(r.addr()).await, 2);
    }
    for r in replicas {
        r.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_takes_only_its_share_of_a_named_clients_quota() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(mut redis) =
        Redis::start("without_redis_each_replica_takes_only_its_share_of_a_named_clients_quota")
    else {
        return;
    };
    let keys = proxypal_nim_sim::generate_test_keys(2);
    let sim = SimServer::start(SimConfig::fast().with_keys(keys.clone())).unwrap();
    let replicas = [
        alice_replica(&sim, &keys, &redis.url(), "").await,
        alice_replica(&sim, &keys, &redis.url(), "").await,
    ];
    for r in &replicas {
        assert_eq!(mode_of(r.addr()).await, "shared");
    }
    redis.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(5);
    for r in &replicas {
        while mode_of(r.addr()).await != "degraded" {
            assert!(Instant::now() < deadline, "degraded once Redis is gone");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let http = http_client();
    // Before the cautious start (a lease and alice's minute after the last
    // heartbeat) the share is not free: answered, by her own quota.
    for i in 0..4 {
        let (status, code) = alice_chat(&http, replicas[i % 2].addr()).await;
        assert_eq!((status, code.as_str()), (429, "client_quota_exceeded"), "request {i}");
    }
    assert_eq!(sim.stats().total_requests, 0);
    // After it, ⌊4 / 2⌋ = 2 per replica: the two together never exceed 4.
    let free = killed + Duration::from_millis(300 + 60_500) + Duration::from_secs(2);
    tokio::time::sleep_until(free.into()).await;
    let mut seen: [Vec<(u16, String)>; 2] = [Vec::new(), Vec::new()];
    for i in 0..8 {
        seen[i % 2].push(alice_chat(&http, replicas[i % 2].addr()).await);
    }
    for (r, seen) in seen.iter().enumerate() {
        assert!(seen.iter().all(|(s, _)| *s == 200 || *s == 429), "never a 5xx: {seen:?}");
        let ok = seen.iter().filter(|(s, _)| *s == 200).count();
        assert_eq!(ok, 2, "replica {r} serves its share of alice's minute: {seen:?}");
        assert!(seen.iter().all(|(s, code)| *s == 200 || code == "client_quota_exceeded"), "{seen:?}");
    }
    assert_eq!(sim.stats().total_requests, 4);
    // Back (empty): both share again, having written what they sent alone.
    redis.restart_empty();
    let deadline = Instant::now() + Duration::from_secs(10);
    for r in &replicas {
        while mode_of(r.addr()).await != "shared" {
            assert!(Instant::now() < deadline, "shared again once Redis is back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Written as the degraded spell's grants and again as the engine's
    // entries after the state loss (as for keys): counted twice, the safe side.
    let logs = redis.cli(&["KEYS", "proxypal:{:clients}:log:client:*"]).unwrap();
    let replayed: u64 = redis.cli(&["ZCARD", logs.trim()]).unwrap().trim().parse().unwrap();
    assert!(replayed >= 4, "alice's four, replayed: {replayed}");
    let (status, code) = alice_chat(&http, replicas[0].addr()).await;
    assert_eq!((status, code.as_str()), (429, "client_quota_exceeded"), "her minute is spent for both");
    for r in replicas {
        r.shutdown().await;
    }
}
