//! `SharedCache`: cached answers in Redis, shared by replicas.

use std::time::{Duration, Instant};

use proxypal_shared::testing::Redis;
use proxypal_shared::{SharedCache, SharedConfig, SharedError};

async fn cache(redis: &Redis, prefix: &str) -> SharedCache {
    let mut config = SharedConfig::new(redis.url());
    config.timeout = Duration::from_millis(200); // a loaded CI box; the product's default is 50 ms
    config.key_prefix = prefix.to_owned();
    SharedCache::connect(config).await.unwrap()
}

const HEX: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_set_by_one_replica_is_read_by_another() {
    let Some(redis) = Redis::start("a_value_set_by_one_replica_is_read_by_another") else { return };
    let (r1, r2) = (cache(&redis, "proxypal").await, cache(&redis, "proxypal").await);
    assert_eq!(r2.get(HEX).await.unwrap(), None);
    let value: Vec<u8> = (0..=255u8).cycle().take(300_000).collect(); // binary, and large
    r1.set(HEX, &value, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r2.get(HEX).await.unwrap(), Some(value));
    r1.set(HEX, b"newer", Duration::from_secs(60)).await.unwrap();
    assert_eq!(r2.get(HEX).await.unwrap().as_deref(), Some(&b"newer"[..]));
    // Named by the prefix and the digest only.
    assert_eq!(redis.cli(&["--scan"]).unwrap().trim(), format!("proxypal:cache:{HEX}"));
    let ttl: u64 = redis.cli(&["PTTL", &format!("proxypal:cache:{HEX}")]).unwrap().trim().parse().unwrap();
    assert!(ttl > 59_000 && ttl <= 60_000, "{ttl}");
    // A key that is not a digest never reaches Redis.
    for bad in ["", "xyz", "0f:1e", "*", &"a".repeat(129)] {
        assert!(matches!(r1.get(bad).await, Err(SharedError::Invalid(_))), "{bad:?}");
        assert!(
            matches!(r1.set(bad, b"v", Duration::from_secs(1)).await, Err(SharedError::Invalid(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_expires_after_its_ttl() {
    let Some(redis) = Redis::start("a_value_expires_after_its_ttl") else { return };
    let r = cache(&redis, "proxypal").await;
    r.set(HEX, b"answer", Duration::from_millis(200)).await.unwrap();
    assert_eq!(r.get(HEX).await.unwrap().as_deref(), Some(&b"answer"[..]));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(r.get(HEX).await.unwrap(), None, "expired on Redis's clock");
    // A zero TTL is a millisecond, not an error.
    r.set(HEX, b"answer", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(r.get(HEX).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_removes_this_prefixs_cache_and_nothing_else() {
    let Some(redis) = Redis::start("clear_removes_this_prefixs_cache_and_nothing_else") else { return };
    let r = cache(&redis, "proxypal").await;
    let other = cache(&redis, "other*").await; // another deployment; a glob character in its name
    let n = 1_234; // more than one SCAN batch
    for i in 0..n {
        r.set(&format!("{i:064x}"), b"v", Duration::from_secs(60)).await.unwrap();
    }
    other.set(HEX, b"theirs", Duration::from_secs(60)).await.unwrap();
    redis.cli(&["SET", "proxypal:{pool}:epoch", "1"]).unwrap(); // the budgets' state
    assert_eq!(r.clear().await.unwrap(), n);
    assert_eq!(r.get(&format!("{:064x}", 7)).await.unwrap(), None);
    assert_eq!(other.get(HEX).await.unwrap().as_deref(), Some(&b"theirs"[..]));
    assert_eq!(redis.cli(&["GET", "proxypal:{pool}:epoch"]).unwrap().trim(), "1");
    assert_eq!(r.clear().await.unwrap(), 0);
    assert_eq!(other.clear().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_is_an_error_within_the_deadline_not_a_hang() {
    let Some(mut redis) = Redis::start("a_killed_redis_is_an_error_within_the_deadline_not_a_hang") else {
        return;
    };
    let r = cache(&redis, "proxypal").await;
    r.set(HEX, b"answer", Duration::from_secs(60)).await.unwrap();
    redis.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let got = r.get(HEX).await;
        let took = started.elapsed();
        assert!(got.is_err(), "{got:?}");
        assert!(took < Duration::from_millis(600), "bounded by the deadline: {took:?}");
        let started = Instant::now();
        assert!(r.set(HEX, b"x", Duration::from_secs(1)).await.is_err());
        assert!(started.elapsed() < Duration::from_millis(600));
    }
    // Back (empty) on the same port: the connection comes back by itself.
    redis.restart_empty();
    let mut back = false;
    for _ in 0..50 {
        if let Ok(None) = r.get(HEX).await {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "answers again once Redis runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_cache_read_its_deadline() {
    let Some(redis) = Redis::start("a_frozen_redis_costs_a_cache_read_its_deadline") else { return };
    let r = cache(&redis, "proxypal").await;
    r.set(HEX, b"answer", Duration::from_secs(60)).await.unwrap();
    redis.signal("-STOP");
    let started = Instant::now();
    let frozen = r.get(HEX).await;
    let took = started.elapsed();
    assert!(matches!(frozen, Err(SharedError::Timeout(_))), "{frozen:?}");
    assert!(took < Duration::from_millis(600), "{took:?}");
    // A write (off the request path) gets at least a second, then gives up.
    let started = Instant::now();
    let write = r.set(HEX, b"x", Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert!(matches!(write, Err(SharedError::Timeout(_))), "{write:?}");
    assert!((Duration::from_secs(1)..Duration::from_millis(1_600)).contains(&took), "{took:?}");
    redis.signal("-CONT");
}
