//! Behaviour of the key pool: order, failover, cooldowns, stats, secrets, reload.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on bad setup

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use proptest::prelude::*;
use proxypal_keypool::{
    CooldownPolicy, CooldownReason, KeyPool, KeySpec, KeyStatus, ManualClock, Outcome, PoolError,
};

/// Generated fake keys that look like NVIDIA's (`nvapi-` + 40 characters).
fn keys(n: usize) -> Vec<KeySpec> {
    (0..n).map(|i| KeySpec::new(format!("nvapi-test{i:04}{}", "x".repeat(26) + &format!("{i:04}")))).collect()
}

fn pool_with_clock(n: usize) -> (KeyPool, ManualClock) {
    let clock = ManualClock::new();
    let pool = KeyPool::builder().clock(clock.clone()).build(keys(n), |_| ()).unwrap();
    (pool, clock)
}

fn picks(pool: &KeyPool, m: usize) -> Vec<usize> {
    (0..m).map(|_| pool.select().expect("a usable key").index()).collect()
}

#[test]
fn round_robin_in_exact_order() {
    let (pool, _) = pool_with_clock(3);
    assert_eq!(picks(&pool, 7), [0, 1, 2, 0, 1, 2, 0]);
}

#[test]
fn rate_limited_key_cools_down_for_default_then_returns_on_its_own() {
    let (pool, clock) = pool_with_clock(3);
    let k0 = pool.select().unwrap();
    pool.report(&k0, Outcome::RateLimited { retry_after: None });
    assert_eq!(picks(&pool, 4), [1, 2, 1, 2], "key 0 skipped, the others alternate");
    match pool.snapshot()[0].status {
        KeyStatus::CoolingDown { remaining, reason } => {
            assert_eq!(reason, CooldownReason::RateLimited);
            assert!(remaining <= Duration::from_secs(60) && remaining > Duration::from_secs(59));
        }
        other => panic!("expected cooling_down, got {other:?}"),
    }
    clock.advance(Duration::from_secs(60));
    assert_eq!(pool.snapshot()[0].status, KeyStatus::Ready);
    assert!(picks(&pool, 3).contains(&0));
}

#[test]
fn retry_after_from_upstream_is_honoured() {
    let (pool, clock) = pool_with_clock(2);
    let k0 = pool.select().unwrap();
    pool.report(&k0, Outcome::RateLimited { retry_after: Some(Duration::from_secs(5)) });
    clock.advance(Duration::from_millis(4_999));
    assert_eq!(picks(&pool, 2), [1, 1]);
    clock.advance(Duration::from_millis(2));
    assert_eq!(picks(&pool, 2), [0, 1]);
}

#[test]
fn transient_failures_grow_the_cooldown_and_a_success_resets_it() {
    let clock = ManualClock::new();
    let policy = CooldownPolicy {
        failure_base: Duration::from_secs(1),
        failure_max: Duration::from_secs(5),
        ..CooldownPolicy::default()
    };
    let pool = KeyPool::builder().clock(clock.clone()).policy(policy).build(keys(2), |_| ()).unwrap();
    let rest = |pool: &KeyPool| match pool.snapshot()[0].status {
        KeyStatus::CoolingDown { remaining, reason: CooldownReason::Failures } => remaining,
        other => panic!("expected failure cooldown, got {other:?}"),
    };
    let k0 = pool.select().unwrap();
    for expected in [1, 2, 4, 5, 5] {
        pool.report(&k0, Outcome::Transient);
        assert_eq!(rest(&pool), Duration::from_secs(expected));
        clock.advance(Duration::from_secs(expected));
        assert_eq!(pool.snapshot()[0].status, KeyStatus::Ready, "ends on its own");
    }
    assert_eq!(pool.snapshot()[0].counters.consecutive_failures, 5);
    pool.report(&k0, Outcome::Success);
    pool.report(&k0, Outcome::Transient);
    assert_eq!(rest(&pool), Duration::from_secs(1), "streak reset");
}

#[test]
fn auth_failure_disables_until_enabled() {
    let (pool, clock) = pool_with_clock(2);
    let k1 = {
        pool.select().unwrap();
        pool.select().unwrap()
    };
    pool.report(&k1, Outcome::AuthFailed);
    clock.advance(Duration::from_secs(3600));
    assert_eq!(pool.snapshot()[1].status, KeyStatus::Disabled);
    assert_eq!(picks(&pool, 3), [0, 0, 0]);
    // A later rate limit does not turn a disabled key back into a cooling one.
    pool.report(&k1, Outcome::RateLimited { retry_after: Some(Duration::from_secs(1)) });
    assert_eq!(pool.snapshot()[1].status, KeyStatus::Disabled);
    assert!(pool.enable(1));
    assert!(!pool.enable(9));
    assert!(picks(&pool, 2).contains(&1));
}

#[test]
fn all_keys_disabled_means_no_selection_and_no_time_to_usable() {
    let (pool, _) = pool_with_clock(2);
    for _ in 0..2 {
        let k = pool.select().unwrap();
        pool.report(&k, Outcome::AuthFailed);
    }
    assert!(pool.select().is_none());
    assert_eq!(pool.time_to_usable(), None);
}

#[test]
fn time_to_usable_is_the_nearest_cooldown() {
    let (pool, _) = pool_with_clock(2);
    let a = pool.select().unwrap();
    let b = pool.select().unwrap();
    pool.report(&a, Outcome::RateLimited { retry_after: Some(Duration::from_secs(9)) });
    pool.report(&b, Outcome::RateLimited { retry_after: Some(Duration::from_secs(3)) });
    let t = pool.time_to_usable().unwrap();
    assert!(t > Duration::from_secs(2) && t <= Duration::from_secs(3), "{t:?}");
}

#[test]
fn predicate_rejections_are_skipped_and_fairness_holds_among_the_rest() {
    let (pool, _) = pool_with_clock(4);
    let got: Vec<usize> = (0..6).map(|_| pool.select_with(|c| c.index != 1).unwrap().index()).collect();
    assert_eq!(got, [0, 2, 3, 0, 2, 3]);
    assert!(pool.select_with(|_| false).is_none());
}

#[test]
fn counters_count_attempts_and_outcomes() {
    let (pool, _) = pool_with_clock(1);
    for outcome in [
        Outcome::Success,
        Outcome::Success,
        Outcome::Transient,
        Outcome::RateLimited { retry_after: Some(Duration::ZERO) },
    ] {
        let k = pool.select().unwrap();
        pool.report(&k, outcome);
        pool.enable(0);
    }
    let c = pool.snapshot()[0].counters;
    assert_eq!((c.requests, c.successes, c.errors, c.rate_limited), (4, 2, 1, 1));
}

#[test]
fn secrets_never_appear_in_debug_display_snapshots_or_errors() {
    let secret = "nvapi-SECRETsecretSECRETsecretSECRET0042";
    let pool = KeyPool::new([KeySpec::new(secret).with_name("team-a")]).unwrap();
    let selected = pool.select().unwrap();
    let spec = KeySpec::new(secret);
    let dup = KeyPool::new([spec.clone(), spec.clone()]).unwrap_err();
    let texts = [
        format!("{pool:?}"),
        format!("{selected:?}"),
        format!("{}", selected.key()),
        format!("{:?}", selected.key()),
        format!("{spec:?}"),
        format!("{:?}", pool.snapshot()),
        format!("{dup} {dup:?}"),
    ];
    for text in &texts {
        assert!(!text.contains(secret), "leaked in {text}");
        assert!(!text.contains("SECRETsecret"), "partial leak in {text}");
    }
    assert_eq!(selected.key().label(), "nvapi-…0042");
    assert!(texts[2].contains("nvapi-…0042 (team-a)"));
    assert_eq!(selected.key().secret().expose(), secret, "the secret is still there to use");
}

#[test]
fn invalid_key_sets_name_the_key() {
    assert_eq!(KeyPool::new([KeySpec::new("  ")]).unwrap_err(), PoolError::EmptySecret { index: 0 });
    let err = KeyPool::new([KeySpec::new("nvapi-ok-1234567890"), KeySpec::new("nvapi-has space-12345")])
        .unwrap_err();
    assert_eq!(err.to_string(), "key #1 (nvapi-…2345): the secret contains whitespace or control characters");
    let err = KeyPool::new(keys(3).into_iter().chain(keys(1))).unwrap_err();
    assert!(matches!(err, PoolError::Duplicate { index: 3, first: 0, .. }), "{err}");
}

#[test]
fn empty_pool_selects_nothing() {
    let pool = KeyPool::new([]).unwrap();
    assert!(pool.is_empty());
    assert!(pool.select().is_none());
}

#[test]
fn reload_keeps_state_of_staying_keys_and_drops_removed_ones_at_once() {
    let (pool, _) = pool_with_clock(3);
    let all = keys(4);
    for _ in 0..3 {
        let k = pool.select().unwrap();
        if k.index() == 1 {
            pool.report(&k, Outcome::RateLimited { retry_after: None });
        }
        if k.index() == 2 {
            pool.report(&k, Outcome::AuthFailed);
        }
    }
    // New set: key 2 (was disabled), key 1 (cooling), key 3 (new). Key 0 removed.
    let report = pool
        .reload([all[2].clone(), all[1].clone().with_name("renamed"), all[3].clone()], |_, _| ())
        .unwrap();
    assert_eq!(report.previous_index, [Some(2), Some(1), None]);
    assert_eq!((report.added, report.kept, report.removed), (1, 2, 1));
    let snap = pool.snapshot();
    assert_eq!(snap[0].status, KeyStatus::Disabled, "a disabled key stays disabled across a reload");
    assert_eq!(snap[0].counters.requests, 1);
    assert!(matches!(snap[1].status, KeyStatus::CoolingDown { .. }), "cooldowns survive");
    assert_eq!(snap[1].name.as_deref(), Some("renamed"));
    assert_eq!(snap[2].counters.requests, 0);
    let labels: Vec<String> = (0..10).map(|_| pool.select().unwrap().key().label().to_owned()).collect();
    let removed = all[0].secret.masked();
    assert!(labels.iter().all(|l| *l != removed), "removed key selected: {labels:?}");
    // A bad reload is refused and the old set keeps serving.
    assert!(pool.reload([KeySpec::new("")], |_, _| ()).is_err());
    assert_eq!(pool.len(), 3);
    assert_eq!(pool.reloads(), 1);
}

#[test]
fn concurrent_selection_is_fair_within_the_thread_count() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 25_000;
    let pool = Arc::new(KeyPool::new(keys(7)).unwrap());
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let pool = Arc::clone(&pool);
            thread::spawn(move || {
                for _ in 0..PER_THREAD {
                    pool.select().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let counts: Vec<u64> = pool.snapshot().iter().map(|s| s.counters.requests).collect();
    assert_eq!(counts.iter().sum::<u64>(), (THREADS * PER_THREAD) as u64);
    let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
    assert!(spread <= THREADS as u64, "counts {counts:?}");
}

#[test]
fn reload_under_concurrent_selection_never_stalls_or_serves_removed_keys() {
    let pool = Arc::new(KeyPool::new(keys(4)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    // Selections so far, so that the reloads overlap selections even on a
    // machine too busy to schedule the workers at once (CI builds alongside).
    let selected = Arc::new(AtomicU64::new(0));
    let all = keys(8);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (pool, stop, selected) = (Arc::clone(&pool), Arc::clone(&stop), Arc::clone(&selected));
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let k = pool.select().expect("never empty");
                    pool.report(&k, Outcome::Success);
                    selected.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let wait_for = |at_least: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while selected.load(Ordering::Relaxed) < at_least && std::time::Instant::now() < deadline {
            thread::yield_now();
        }
    };
    wait_for(100);
    for round in 0..200 {
        let set = if round % 2 == 0 { &all[2..6] } else { &all[4..8] };
        thread::yield_now();
        pool.reload(set.iter().cloned(), |_, _| ()).unwrap();
    }
    // Some selections on the last generation too (keys 4 and 5 are in it).
    wait_for(selected.load(Ordering::Relaxed) + 100);
    stop.store(true, Ordering::Relaxed);
    let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(total > 0);
    // Keys 4 and 5 were in every generation: their counters must survive one more reload.
    let before: Vec<u64> = pool.snapshot()[..2].iter().map(|s| s.counters.requests).collect();
    assert!(before.iter().all(|&n| n > 0), "{before:?}");
    pool.reload(all[4..6].iter().cloned(), |_, _| ()).unwrap();
    let after: Vec<u64> = pool.snapshot().iter().map(|s| s.counters.requests).collect();
    assert_eq!(before, after);
    let allowed: Vec<String> = all[4..6].iter().map(|s| s.secret.masked()).collect();
    for _ in 0..100 {
        let k = pool.select().unwrap();
        assert!(allowed.contains(&k.key().label().to_owned()));
    }
}

proptest! {
    /// M sequential selections over N usable keys: per-key counts differ by at most 1,
    /// also when a fixed subset of keys is cooling down (fairness among the rest).
    #[test]
    fn sequential_fairness(n in 1usize..40, m in 0usize..2_000, cooling in prop::collection::vec(any::<bool>(), 40)) {
        let (pool, _) = pool_with_clock(n);
        // Cool the chosen keys down (keep at least one usable).
        let mut usable = Vec::new();
        for (i, &cool) in cooling.iter().enumerate().take(n) {
            let k = pool.select_with(|c| c.index == i).unwrap();
            if cool && (i + 1 < n || !usable.is_empty()) {
                pool.report(&k, Outcome::RateLimited { retry_after: None });
            } else {
                usable.push(i);
            }
        }
        let before: Vec<u64> = pool.snapshot().iter().map(|s| s.counters.requests).collect();
        for _ in 0..m {
            pool.select().unwrap();
        }
        let snap = pool.snapshot();
        let counts: Vec<u64> = usable.iter().map(|&i| snap[i].counters.requests - before[i]).collect();
        let spread = counts.iter().max().unwrap() - counts.iter().min().unwrap();
        prop_assert!(spread <= 1, "counts {:?}", counts);
        prop_assert_eq!(counts.iter().sum::<u64>(), m as u64);
    }
}

#[test]
fn time_to_selectable_combines_cooldowns_with_the_callers_wait() {
    let (pool, _) = pool_with_clock(3);
    let a = pool.select().unwrap();
    let b = pool.select().unwrap();
    pool.report(&a, Outcome::RateLimited { retry_after: Some(Duration::from_secs(9)) });
    pool.report(&b, Outcome::AuthFailed);
    // Key 2 is ready but (say) its limiter needs 12 s; key 0 cools for 9 s and its limiter is ready.
    let wait = pool
        .time_to_selectable(|c| Some(if c.index == 2 { Duration::from_secs(12) } else { Duration::ZERO }));
    assert_eq!(wait, Some(Duration::from_secs(9)));
    // Leaving key 0 out: only key 2 is left.
    assert_eq!(
        pool.time_to_selectable(|c| (c.index != 0).then_some(Duration::from_secs(12))),
        Some(Duration::from_secs(12))
    );
    assert_eq!(
        pool.time_to_selectable(|c| (c.index == 1).then_some(Duration::ZERO)),
        None,
        "disabled keys are left out"
    );
}

#[test]
fn a_saved_state_comes_back_after_a_restart() {
    let pool = KeyPool::new((0..3).map(|i| KeySpec::new(format!("nvapi-restore-test-{i:020}")))).unwrap();
    assert!(pool.restore(0, KeyStatus::Disabled));
    let resting =
        KeyStatus::CoolingDown { remaining: Duration::from_secs(30), reason: CooldownReason::RateLimited };
    assert!(pool.restore(1, resting));
    assert!(pool.restore(2, KeyStatus::Ready));
    assert!(!pool.restore(3, KeyStatus::Disabled), "no such key");
    let snap = pool.snapshot();
    assert_eq!(snap[0].status, KeyStatus::Disabled);
    match snap[1].status {
        KeyStatus::CoolingDown { remaining, reason } => {
            assert!(remaining > Duration::from_secs(29) && remaining <= Duration::from_secs(30));
            assert_eq!(reason, CooldownReason::RateLimited);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(snap[2].status, KeyStatus::Ready);
    assert_eq!(pool.select().map(|k| k.index()), Some(2), "only the restored-ready key is selectable");
}

#[test]
fn a_key_chosen_elsewhere_is_selected_without_moving_the_cursor() {
    let (pool, _clock) = pool_with_clock(3);
    // Offer the candidates in round-robin order without taking one…
    let mut offered = Vec::new();
    assert!(
        pool.select_with(|c| {
            offered.push(c.index);
            false
        })
        .is_none()
    );
    assert_eq!(offered, [0, 1, 2]);
    // …then take the one an outside decision picked.
    let chosen = pool.select_at(2, |_| true).unwrap();
    assert_eq!(chosen.index(), 2);
    assert_eq!(picks(&pool, 2), [1, 2], "the cursor moved once, by the offer");
    pool.report(&chosen, Outcome::AuthFailed);
    assert_eq!(pool.status_of(&chosen), KeyStatus::Disabled);
    assert!(pool.select_at(2, |_| true).is_none(), "a disabled key is not selected");
    assert!(pool.select_at(0, |_| false).is_none());
    assert!(pool.select_at(7, |_| true).is_none());
}
