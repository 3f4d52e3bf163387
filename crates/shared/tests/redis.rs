//! Against a real `redis-server`, started by each test on a free loopback
//! port (never the machine's own Redis, which other tests may use): two
//! "replicas" (two connections) share one window, key health, NOSCRIPT and
//! state loss, a frozen Redis; the response cache's values (`cache`). Without `redis-server` the tests say they are
//! skipped and why; under `CI=true` that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "redis/cache.rs"]
mod cache;

use std::time::{Duration, Instant};

use proxypal_shared::testing::Redis;
use proxypal_shared::{Admission, Candidate, SharedBudgets, SharedConfig, SharedError, Window};

async fn replica(redis: &Redis) -> SharedBudgets {
    let mut config = SharedConfig::new(redis.url());
    config.timeout = Duration::from_millis(200); // a loaded CI box; the product's default is 50 ms
    SharedBudgets::connect(config).await.unwrap()
}

const KEY_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const KEY_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_together_admit_exactly_the_window() {
    let Some(redis) = Redis::start("two_replicas_together_admit_exactly_the_window") else { return };
    let (r1, r2) = (replica(&redis).await, replica(&redis).await);
    let window = [Window::new("m", Duration::from_millis(1_500), 5)];
    let candidates = [Candidate::new(KEY_A, &window)];
    // 12 attempts at once from two replicas: 5 admitted, whoever asks.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let r = if i % 2 == 0 { r1.clone() } else { r2.clone() };
        tasks.push(tokio::spawn(async move {
            let window = [Window::new("m", Duration::from_millis(1_500), 5)];
            r.admit("pool", &[Candidate::new(KEY_A, &window)]).await.unwrap()
        }));
    }
    let mut answers: Vec<Admission> = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| a.admitted == Some(0)).count(), 5, "{answers:?}");
    let first = answers.iter().filter(|a| a.admitted.is_some()).map(|a| a.now_us).min().unwrap();
    for a in answers.iter().filter(|a| a.admitted.is_none()) {
        let wait = a.wait.unwrap();
        // Room comes back when the oldest admission leaves the window.
        let frees_at = first + 1_500_000;
        assert!(wait <= Duration::from_micros(frees_at - a.now_us) + Duration::from_millis(5), "{a:?}");
        assert!(wait > Duration::from_millis(1_000), "{a:?}");
    }
    // Still full a moment later; free once the window has passed (Redis's clock).
    assert_eq!(r2.admit("pool", &candidates).await.unwrap().admitted, None);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    assert_eq!(r1.admit("pool", &candidates).await.unwrap().admitted, Some(0));
    // The log holds fingerprints and request ids, never a key.
    let keys = redis.cli(&["--scan"]).unwrap();
    assert!(keys.lines().all(|k| k.starts_with("proxypal:{pool}:")), "{keys}");
    let bytes = r1.memory_usage("pool", KEY_A, "m").await.unwrap().unwrap();
    assert!(bytes < 1_000, "a small log is a few hundred bytes: {bytes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_must_have_room_and_the_next_candidate_serves() {
    let Some(redis) = Redis::start("every_window_must_have_room_and_the_next_candidate_serves") else {
        return;
    };
    let r = replica(&redis).await;
    // 3 per second and 4 per 10 s: the tighter one decides.
    let windows = [Window::new("s", Duration::from_secs(1), 3), Window::new("t", Duration::from_secs(10), 4)];
    let both = [Candidate::new(KEY_A, &windows), Candidate::new(KEY_B, &windows)];
    let mut on = [0, 0];
    for _ in 0..6 {
        let a = r.admit("pool", &both).await.unwrap();
        on[a.admitted.unwrap()] += 1;
    }
    assert_eq!(on, [3, 3], "A's second is full after 3: B serves");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(r.admit("pool", &both).await.unwrap().admitted, Some(0));
    assert_eq!(r.admit("pool", &both).await.unwrap().admitted, Some(1));
    // A and B have 4 each in the last 10 s: nothing, and the wait is the 10 s window's.
    let none = r.admit("pool", &both).await.unwrap();
    assert_eq!(none.admitted, None);
    assert!(none.wait.unwrap() > Duration::from_secs(8), "{none:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooldown_or_disabled_key_set_by_one_replica_is_skipped_by_the_other() {
    let Some(redis) = Redis::start("a_cooldown_or_disabled_key_set_by_one_replica") else { return };
    let (r1, r2) = (replica(&redis).await, replica(&redis).await);
    let window = [Window::new("m", Duration::from_secs(60), 100)];
    let both = [Candidate::new(KEY_A, &window), Candidate::new(KEY_B, &window)];
    r1.cool_down("pool", KEY_A, Duration::from_secs(30)).await.unwrap();
    // A shorter cooldown later never shortens it.
    r2.cool_down("pool", KEY_A, Duration::from_secs(1)).await.unwrap();
    assert_eq!(r2.admit("pool", &both).await.unwrap().admitted, Some(1), "A rests: B");
    let only_a = [Candidate::new(KEY_A, &window)];
    let wait = r2.admit("pool", &only_a).await.unwrap().wait.unwrap();
    assert!(wait > Duration::from_secs(29) && wait <= Duration::from_secs(30), "{wait:?}");
    r1.disable("pool", KEY_B).await.unwrap();
    let none = r2.admit("pool", &[Candidate::new(KEY_B, &window)]).await.unwrap();
    assert_eq!((none.admitted, none.wait), (None, None), "every candidate disabled: no wait to give");
    r1.enable("pool", KEY_A).await.unwrap();
    r1.enable("pool", KEY_B).await.unwrap();
    assert_eq!(r2.admit("pool", &both).await.unwrap().admitted, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_and_an_empty_restart_are_survived_and_noticed() {
    let Some(mut redis) = Redis::start("script_flush_and_an_empty_restart_are_survived_and_noticed") else {
        return;
    };
    let r = replica(&redis).await;
    let window = [Window::new("m", Duration::from_secs(60), 10)];
    let a = [Candidate::new(KEY_A, &window)];
    assert!(r.admit("pool", &a).await.unwrap().state_lost, "a new pool has no state yet");
    assert!(!r.admit("pool", &a).await.unwrap().state_lost);
    // The script cache emptied: reloaded on NOSCRIPT, no error.
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]).unwrap().trim(), "OK");
    let after = r.admit("pool", &a).await.unwrap();
    assert_eq!((after.admitted, after.state_lost), (Some(0), false));
    // Redis restarted empty on the same port: the connection comes back by
    // itself, and the epoch says the windows forgot what they counted.
    redis.kill();
    redis.restart_empty();
    let mut seen = None;
    for _ in 0..50 {
        match r.admit("pool", &a).await {
            Ok(answer) => {
                seen = Some(answer);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let answer = seen.expect("reconnected within 5 s");
    assert!(answer.state_lost, "{answer:?}");
    assert_eq!(answer.admitted, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_a_call_its_deadline_not_more() {
    let Some(redis) = Redis::start("a_frozen_redis_costs_a_call_its_deadline_not_more") else { return };
    let r = replica(&redis).await;
    let window = [Window::new("m", Duration::from_secs(60), 10)];
    let a = [Candidate::new(KEY_A, &window)];
    assert!(r.admit("pool", &a).await.is_ok());
    redis.signal("-STOP");
    let started = Instant::now();
    let frozen = r.admit("pool", &a).await;
    let took = started.elapsed();
    assert!(matches!(frozen, Err(SharedError::Timeout(_))), "{frozen:?}");
    assert!(took < Duration::from_millis(600), "bounded by the deadline: {took:?}");
    redis.signal("-CONT");
    let mut back = false;
    for _ in 0..50 {
        if r.admit("pool", &a).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "answers again once Redis runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_heartbeat_lapsed_keeps_its_share_and_a_graceful_leave_frees_it() {
    let Some(redis) = Redis::start("a_replica_whose_heartbeat_lapsed_keeps_its_share") else { return };
    // Three replicas at most; a window of 30: each one's share is 10.
    let r1 = replica(&redis).await.with_replicas(3);
    let r2 = replica(&redis).await.with_replicas(3);
    let r3 = replica(&redis).await.with_replicas(3);
    let (lease, reservation) = (Duration::from_millis(1_000), Duration::from_secs(30));
    for r in [&r1, &r2, &r3] {
        r.heartbeat("pool", lease, reservation).await.unwrap();
    }
    let m = r1.heartbeat("pool", lease, reservation).await.unwrap();
    assert_eq!((m.live, m.suspects), (3, 0));
    // r3 goes quiet (lost Redis, maybe serving its share alone); r1 and r2 keep beating.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    r2.heartbeat("pool", lease, reservation).await.unwrap();
    let m = r1.heartbeat("pool", lease, reservation).await.unwrap();
    assert_eq!((m.live, m.suspects), (2, 1));
    let window = [Window::new("m", Duration::from_secs(60), 30)];
    let a = [Candidate::new(KEY_A, &window)];
    let mut admitted = 0;
    for i in 0..30 {
        let r = if i % 2 == 0 { &r1 } else { &r2 };
        let answer = r.admit("pool", &a).await.unwrap();
        assert_eq!(answer.suspects, 1);
        admitted += usize::from(answer.admitted.is_some());
    }
    assert_eq!(admitted, 20, "30 less the suspect's share of 10");
    // r3 comes back: it replays the 10 it sent alone, then beats again — nothing more is free.
    let now = r3.admit("pool", &[]).await.unwrap().now_us;
    let sent: Vec<u64> = (0..10).map(|i| now - 300_000 + i * 1_000).collect();
    assert_eq!(r3.replay("pool", KEY_A, window[0], &sent).await.unwrap(), 30);
    r3.heartbeat("pool", lease, reservation).await.unwrap();
    assert_eq!(r1.admit("pool", &a).await.unwrap().admitted, None, "20 shared + 10 replayed = 30");
    // A replica that leaves gracefully keeps nothing back.
    let b = [Candidate::new(KEY_B, &window)];
    r3.leave("pool").await.unwrap();
    r1.heartbeat("pool", lease, reservation).await.unwrap();
    r2.heartbeat("pool", lease, reservation).await.unwrap();
    let mut free = 0;
    for _ in 0..31 {
        free += usize::from(r1.admit("pool", &b).await.unwrap().admitted.is_some());
    }
    assert_eq!(free, 30, "no suspect: the whole window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calendar_window_counts_until_its_end_and_a_stale_one_is_refused() {
    let Some(redis) = Redis::start("a_calendar_window_counts_until_its_end") else { return };
    let (r1, r2) = (replica(&redis).await, replica(&redis).await);
    // Redis's now, from an admission with no candidate.
    let now = r1.admit("pool", &[]).await.unwrap().now_us;
    let (start, end) = (now - 1_000_000, now + 3_000_000);
    let day = [Window::calendar("d", start, end, 3)];
    let a = [Candidate::new(KEY_A, &day)];
    let mut admitted = 0;
    for r in [&r1, &r2, &r1, &r2] {
        admitted += usize::from(r.admit("pool", &a).await.unwrap().admitted.is_some());
    }
    assert_eq!(admitted, 3, "three in the calendar window, from both replicas");
    let full = r2.admit("pool", &a).await.unwrap();
    let wait = full.wait.unwrap();
    assert!(
        wait <= Duration::from_micros(end - full.now_us) && wait > Duration::from_secs(2),
        "until its end: {wait:?}"
    );
    // Another window (another start: a counter of its own) has room; one that
    // does not hold Redis's now is refused, uncharged.
    let next = [Window::calendar("d", start + 1, end + 100_000_000, 3)];
    assert_eq!(r1.admit("pool", &[Candidate::new(KEY_A, &next)]).await.unwrap().admitted, Some(0));
    let ahead = [Window::calendar("d", now + 5_000_000, now + 10_000_000, 3)];
    assert!(
        matches!(
            r1.admit("pool", &[Candidate::new(KEY_A, &ahead)]).await,
            Err(SharedError::StaleCalendar { .. })
        ),
        "a window that has not begun on Redis's clock (a replica's clock ahead across a reset) is refused"
    );
    let past = [Window::calendar("d", start - 10_000_000, start, 3)];
    match r1.admit("pool", &[Candidate::new(KEY_A, &past)]).await {
        Err(SharedError::StaleCalendar { now_us }) => assert!(now_us >= now),
        other => panic!("a stale calendar window: {other:?}"),
    }
    // Rolling and calendar windows of one key together: both must have room.
    let both = [Window::new("m", Duration::from_secs(60), 10), Window::calendar("d", start, end, 3)];
    assert_eq!(r1.admit("pool", &[Candidate::new(KEY_B, &both)]).await.unwrap().admitted, Some(0));
    // Admissions made without Redis are added to a calendar counter.
    assert_eq!(r1.replay("pool", KEY_A, day[0], &[now, now]).await.unwrap(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_window_is_one_log_for_all_of_its_keys() {
    let Some(redis) = Redis::start("an_account_window_is_one_log_for_all_of_its_keys") else { return };
    let r = replica(&redis).await;
    let account = [Window::new("m", Duration::from_secs(60), 3).of("acct:team")];
    let own_and_account = [
        Window::new("m", Duration::from_secs(60), 2),
        Window::new("m", Duration::from_secs(60), 3).of("acct:team"),
    ];
    let a = [Candidate::new(KEY_A, &account)];
    let b = [Candidate::new(KEY_B, &own_and_account)];
    assert_eq!(r.admit("pool", &b).await.unwrap().admitted, Some(0));
    assert_eq!(r.admit("pool", &a).await.unwrap().admitted, Some(0));
    assert_eq!(r.admit("pool", &a).await.unwrap().admitted, Some(0));
    assert_eq!(r.admit("pool", &a).await.unwrap().admitted, None, "the account's 3 are spent by both keys");
    assert_eq!(
        r.admit("pool", &b).await.unwrap().admitted,
        None,
        "B has room of its own, the account has none"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_state_loss_admissions_wait_for_every_replica_to_replay() {
    let Some(redis) = Redis::start("after_a_state_loss_admissions_wait_for_every_replica_to_replay") else {
        return;
    };
    let r1 = replica(&redis).await.with_replicas(2);
    let r2 = replica(&redis).await.with_replicas(2);
    r1.set_recovery_hold(Duration::from_secs(5));
    let (lease, reservation) = (Duration::from_secs(1), Duration::from_secs(30));
    let window = [Window::new("m", Duration::from_secs(60), 10)];
    let a = [Candidate::new(KEY_A, &window)];
    // The first contact creates the epoch: nobody has replayed into it yet.
    let m1 = r1.heartbeat("pool", lease, reservation).await.unwrap();
    assert!(!m1.replayed);
    let held = r1.admit("pool", &a).await.unwrap();
    assert!(held.recovering && held.admitted.is_none(), "{held:?}");
    assert!(held.wait.unwrap() <= Duration::from_millis(25), "looks again soon: {held:?}");
    assert!(r1.replayed("pool", m1.epoch).await.unwrap());
    assert!(r1.admit("pool", &a).await.unwrap().recovering, "one of two replayed");
    assert!(r2.replayed("pool", m1.epoch).await.unwrap());
    for _ in 0..4 {
        assert_eq!(r1.admit("pool", &a).await.unwrap().admitted, Some(0));
    }
    // Redis loses everything: the epoch changes; r1 replays its four, r2 its none.
    redis.cli(&["FLUSHALL"]).unwrap();
    let m = r2.heartbeat("pool", lease, reservation).await.unwrap();
    assert!(m.epoch != m1.epoch && !m.replayed);
    assert!(r1.admit("pool", &a).await.unwrap().recovering);
    assert!(!r1.replayed("pool", m1.epoch).await.unwrap(), "the old epoch is gone");
    let now = m.now_us;
    assert_eq!(r1.replay("pool", KEY_A, window[0], &[now - 4, now - 3, now - 2, now - 1]).await.unwrap(), 4);
    assert!(r1.replayed("pool", m.epoch).await.unwrap() && r2.replayed("pool", m.epoch).await.unwrap());
    let mut admitted = 0;
    for _ in 0..10 {
        admitted += usize::from(r1.admit("pool", &a).await.unwrap().admitted.is_some());
    }
    assert_eq!(admitted, 6, "what was sent before the loss still counts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reserved_then_settled_and_concurrency_slots_come_back() {
    let Some(redis) = Redis::start("tokens_are_reserved_then_settled_and_concurrency_slots_come_back") else {
        return;
    };
    let (r1, r2) = (replica(&redis).await, replica(&redis).await);
    let tokens = [Window::tokens("t", Duration::from_secs(60), 1_000)];
    let a = [Candidate::new(KEY_A, &tokens)];
    let first = r1.admit_reserving("pool", &a, 600).await.unwrap();
    assert_eq!(first.admitted, Some(0));
    assert_eq!(r2.admit_reserving("pool", &a, 300).await.unwrap().admitted, Some(0), "900 < 1000");
    assert_eq!(r1.admit_reserving("pool", &a, 5_000).await.unwrap().admitted, Some(0), "clamped to 1000");
    let full = r2.admit_reserving("pool", &a, 1).await.unwrap();
    assert_eq!(full.admitted, None, "1900 reserved");
    assert_eq!(full.wait, Some(Duration::from_millis(20)), "reservations only: one settling may make room");
    // The first used 100 of its 600; the third 50 of its (clamped) 1000: 450 in all.
    r1.settle("pool", KEY_A, &tokens, first.request, 600, 100).await.unwrap();
    assert_eq!(r2.admit_reserving("pool", &a, 1).await.unwrap().admitted, None, "1400 still");
    let third = first.request + 1;
    r1.settle("pool", KEY_A, &tokens, third, 5_000, 50).await.unwrap();
    assert_eq!(r2.admit_reserving("pool", &a, 1).await.unwrap().admitted, Some(0), "451 < 1000");

    let slots = [Window::concurrency("c", Duration::from_secs(30), 2)];
    let b = [Candidate::new(KEY_B, &slots)];
    let one = r1.admit("pool", &b).await.unwrap();
    assert_eq!(r2.admit("pool", &b).await.unwrap().admitted, Some(0));
    let third = r1.admit("pool", &b).await.unwrap();
    assert_eq!(third.admitted, None, "two in flight");
    assert_eq!(third.wait, Some(Duration::from_millis(20)), "looks again soon");
    r1.settle("pool", KEY_B, &slots, one.request, 0, 0).await.unwrap();
    assert_eq!(r2.admit("pool", &b).await.unwrap().admitted, Some(0), "a slot came back");

    // A limit one replica learned holds for the other.
    let minute = [Window::new("m", Duration::from_secs(60), 5)];
    let c = [Candidate::new("sha256:cccccccccccccccccccccccccccccccc", &minute)];
    r1.learn("pool", c[0].id, &minute[0], 1).await.unwrap();
    assert_eq!(r2.admit("pool", &c).await.unwrap().admitted, Some(0));
    assert_eq!(r2.admit("pool", &c).await.unwrap().admitted, None, "learned: 1, not 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_connect_through_rustls_with_a_ca_file() {
    let Some((_redis, url, ca)) = Redis::start_tls("rediss_urls_connect_through_rustls_with_a_ca_file")
    else {
        return;
    };
    let mut config = SharedConfig::new(url.clone());
    config.timeout = Duration::from_millis(500);
    config.ca_pem = Some(ca);
    let r = SharedBudgets::connect(config).await.unwrap();
    let window = [Window::new("m", Duration::from_secs(60), 1)];
    assert_eq!(r.admit("pool", &[Candidate::new(KEY_A, &window)]).await.unwrap().admitted, Some(0));
    // Without the CA, the self-signed chain is refused: no answer, an error.
    let mut untrusted = SharedConfig::new(url);
    untrusted.timeout = Duration::from_millis(500);
    assert!(SharedBudgets::connect(untrusted).await.is_err(), "an unknown CA is not trusted");
}
