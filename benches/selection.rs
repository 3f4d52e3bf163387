//! `cargo bench --bench selection`: the cost of choosing a key.
//!
//! The full selection path (keypool round robin gated by the per-key governor
//! limiter) beside the primitives it is made of, in one run, so the overhead
//! is a ratio: a bare atomic `fetch_add` (the cursor) and a bare governor
//! `check` (the permit). Pool sizes 3, 100 and 10,000, one thread and two
//! threads contending, and a case where most keys are exhausted so the cursor
//! must skip. A summary table with ratios is printed at the end (from
//! criterion's estimates), ready for docs/performance.md.
//!
//! The `gateway` group is the path the server runs per attempt:
//! `proxypal_gateway::lease::try_lease` over the gateway's key set (the
//! round robin, the request's tried-keys check, the permit, and the lease's
//! `Authorization` value and metric handles), beside `select/limited`, the
//! bare keypool + limiter composition, measured in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used)] // bench setup may panic

use std::hint::black_box;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use governor::{Quota, RateLimiter};
use proxypal::gateway::lease::{Tried, try_lease};
use proxypal::gateway::{Gateway, GatewayConfig, KeyResources};
use proxypal::keypool::{KeyPool, KeySpec};
use proxypal::limiter::{GovernorLimiter, KeyBudget, KeyQuota, Limits, QuotaEngine, RateLimit};

/// A quota that never binds during a bench: the path does all its work
/// (clock read, CAS) but always grants.
/// A rolling minute far above any load: the engine's one-window path.
fn open_limits() -> Limits {
    Limits { requests_per_minute: Some(u64::MAX / 2), ..Limits::nvidia_free_tier() }
}

/// Every kind of window at once, far above any load.
fn every_window() -> Limits {
    Limits {
        requests_per_day: Some(u64::MAX / 2),
        day_reset: Some("00:00 UTC".parse().unwrap()),
        tokens_per_minute: Some(u64::MAX / 2),
        max_concurrent: Some(u32::MAX),
        ..open_limits()
    }
}

fn engine(limits: &Limits) -> QuotaEngine {
    let spec = limits.compile().unwrap();
    QuotaEngine::system([KeyBudget { own: Some(spec), ..KeyBudget::default() }])
}

fn open_quota() -> KeyQuota {
    KeyQuota::new(u32::MAX, u32::MAX).unwrap().with_margin(Duration::ZERO).unwrap()
}

fn keys(n: usize) -> Vec<KeySpec> {
    (0..n).map(|i| KeySpec::new(format!("nvapi-bench-{i:036}"))).collect()
}

fn limited_pool(n: usize, quota: impl Fn(usize) -> KeyQuota) -> KeyPool<GovernorLimiter> {
    KeyPool::builder().build(keys(n), |ks| GovernorLimiter::new((0..ks.len()).map(&quota))).unwrap()
}

#[inline]
fn select(pool: &KeyPool<GovernorLimiter>) -> usize {
    pool.select_with(|c| c.attachment.take_permit(c.index)).map_or(usize::MAX, |s| s.index())
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns the
/// wall time, so the result is the time per operation with `threads` contending.
fn contended<T: Sync>(state: &T, threads: usize, iters: u64, op: impl Fn(&T) + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..iters {
                        op(state);
                    }
                    start.elapsed()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    let cursor = AtomicUsize::new(0);
    g.bench_function("fetch_add", |b| b.iter(|| black_box(cursor.fetch_add(1, Ordering::Relaxed))));
    let gov = RateLimiter::direct(Quota::per_second(NonZeroU32::MAX));
    g.bench_function("governor_check", |b| b.iter(|| black_box(gov.check().is_ok())));
    g.bench_function("fetch_add/2threads", |b| {
        b.iter_custom(|iters| {
            contended(&cursor, 2, iters, |a| {
                black_box(a.fetch_add(1, Ordering::Relaxed));
            })
        })
    });
    let gov = Arc::new(RateLimiter::direct(Quota::per_second(NonZeroU32::MAX)));
    g.bench_function("governor_check/2threads", |b| {
        b.iter_custom(|iters| {
            contended(&gov, 2, iters, |l| {
                black_box(l.check().is_ok());
            })
        })
    });
    // The sum of the parts done the way the path does them: both on the same
    // thread, interleaved (a cursor tick, then a permit check).
    let parts = (AtomicUsize::new(0), RateLimiter::direct(Quota::per_second(NonZeroU32::MAX)));
    g.bench_function("fetch_add+governor_check", |b| {
        b.iter(|| black_box((parts.0.fetch_add(1, Ordering::Relaxed), parts.1.check().is_ok())))
    });
    g.bench_function("fetch_add+governor_check/2threads", |b| {
        b.iter_custom(|iters| {
            contended(&parts, 2, iters, |(a, l)| {
                black_box((a.fetch_add(1, Ordering::Relaxed), l.check().is_ok()));
            })
        })
    });
    g.finish();

    // One key's grant: today's GCRA-only check beside the quota engine's
    // windows, in the same run.
    let mut g = c.benchmark_group("quota");
    let gcra = GovernorLimiter::new([open_quota()]);
    g.bench_function("gcra_only", |b| b.iter(|| black_box(gcra.take_permit(0))));
    let minute = engine(&open_limits());
    g.bench_function("rolling_minute", |b| b.iter(|| black_box(minute.try_acquire(0, 0).is_some())));
    let all = engine(&every_window());
    g.bench_function("every_window", |b| {
        b.iter(|| black_box(all.try_acquire(0, 100).map(|p| p.finish(Some(90)))))
    });
    g.bench_function("rolling_minute/2threads", |b| {
        b.iter_custom(|iters| {
            contended(&minute, 2, iters, |e| {
                black_box(e.try_acquire(0, 0).is_some());
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("select");
    for n in [3usize, 100, 10_000] {
        let pool = limited_pool(n, |_| open_quota());
        g.bench_with_input(BenchmarkId::new("limited", n), &pool, |b, p| b.iter(|| black_box(select(p))));
        g.bench_with_input(BenchmarkId::new("limited/2threads", n), &pool, |b, p| {
            b.iter_custom(|iters| {
                contended(p, 2, iters, |p| {
                    black_box(select(p));
                })
            })
        });
    }
    let plain = KeyPool::new(keys(100)).unwrap();
    g.bench_function("unlimited/100", |b| b.iter(|| black_box(plain.select().map(|s| s.index()))));
    g.finish();

    // The server's path: a lease through the gateway (what each attempt does).
    let mut g = c.benchmark_group("gateway");
    for n in [3usize, 100, 10_000] {
        let mut config = GatewayConfig::with_keys(keys(n));
        config.providers[0].limits = open_limits();
        let gateway = Gateway::new(config, &mut prometheus_client::registry::Registry::default()).unwrap();
        let provider = gateway.provider("default").unwrap();
        let lease = |keys: &KeyPool<KeyResources>| {
            try_lease(keys, 0, &Tried::default(), 0).map_or(usize::MAX, |l| l.selected.index())
        };
        g.bench_with_input(BenchmarkId::new("lease", n), provider.keys(), |b, gw| {
            b.iter(|| black_box(lease(gw)))
        });
        g.bench_with_input(BenchmarkId::new("lease/2threads", n), provider.keys(), |b, gw| {
            b.iter_custom(|iters| {
                contended(gw, 2, iters, |gw| {
                    black_box(lease(gw));
                })
            })
        });
    }
    g.finish();

    // Most keys exhausted: 1 key in `stride` has permits, the others are spent,
    // so every selection skips ~stride-1 keys (each costing a failed governor check).
    let mut g = c.benchmark_group("skip");
    for stride in [1usize, 10, 100, 1_000] {
        let spent = KeyQuota::new(1, 1).unwrap(); // one permit per minute
        let pool = limited_pool(10_000, |i| if i % stride == 0 { open_quota() } else { spent });
        pool.with_current(|_, l| {
            (0..10_000).filter(|i| i % stride != 0).for_each(|i| {
                l.take_permit(i);
            })
        });
        g.bench_with_input(BenchmarkId::new("exhausted_every", stride), &pool, |b, p| {
            b.iter(|| black_box(select(p)))
        });
    }
    g.finish();
}

/// Reads criterion's point estimate (ns) for one benchmark of this run.
fn estimate(id: &str) -> Option<f64> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"), PathBuf::from);
    let text = std::fs::read_to_string(dir.join("criterion").join(id).join("new/estimates.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn print_table() {
    let (Some(fa), Some(gc)) = (estimate("baseline/fetch_add"), estimate("baseline/governor_check")) else {
        return; // test mode (`cargo test --benches`) or a filtered run: no estimates
    };
    let fa2 = estimate("baseline/fetch_add_2threads").unwrap_or(f64::NAN);
    let gc2 = estimate("baseline/governor_check_2threads").unwrap_or(f64::NAN);
    let both = estimate("baseline/fetch_add+governor_check").unwrap_or(f64::NAN);
    let both2 = estimate("baseline/fetch_add+governor_check_2threads").unwrap_or(f64::NAN);
    println!("\n## selection summary (mean ns per selection; ratio = path / (fetch_add + governor check))\n");
    println!("| case | keys | threads | ns | baseline ns | ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| fetch_add | - | 1 | {fa:.1} | - | - |");
    println!("| governor check | - | 1 | {gc:.1} | - | - |");
    println!("| fetch_add | - | 2 | {fa2:.1} | - | - |");
    println!("| governor check | - | 2 | {gc2:.1} | - | - |");
    println!("| fetch_add + governor check, interleaved | - | 1 | {both:.1} | - | - |");
    println!("| fetch_add + governor check, interleaved | - | 2 | {both2:.1} | - | - |");
    for n in [3, 100, 10_000] {
        if let Some(t) = estimate(&format!("select/limited/{n}")) {
            println!("| select (limited) | {n} | 1 | {t:.1} | {:.1} | {:.2} |", fa + gc, t / (fa + gc));
        }
        if let Some(t) = estimate(&format!("select/limited_2threads/{n}")) {
            println!("| select (limited) | {n} | 2 | {t:.1} | {:.1} | {:.2} |", fa2 + gc2, t / (fa2 + gc2));
            println!(
                "| select (limited) vs interleaved parts | {n} | 2 | {t:.1} | {both2:.1} | {:.2} |",
                t / both2
            );
        }
    }
    for n in [3, 100, 10_000] {
        let base = estimate(&format!("select/limited/{n}"));
        if let (Some(t), Some(base)) = (estimate(&format!("gateway/lease/{n}")), base) {
            println!(
                "| gateway lease vs select (limited) | {n} | 1 | {t:.1} | {base:.1} | {:.2} |",
                t / base
            );
        }
        let base = estimate(&format!("select/limited_2threads/{n}"));
        if let (Some(t), Some(base)) = (estimate(&format!("gateway/lease_2threads/{n}")), base) {
            println!(
                "| gateway lease vs select (limited) | {n} | 2 | {t:.1} | {base:.1} | {:.2} |",
                t / base
            );
        }
    }
    if let Some(t) = estimate("select/unlimited_100") {
        println!("| select (no limiter) | 100 | 1 | {t:.1} | {fa:.1} | {:.2} |", t / fa);
    }
    for stride in [1, 10, 100, 1_000] {
        if let Some(t) = estimate(&format!("skip/exhausted_every/{stride}")) {
            println!(
                "| skip: 1 in {stride} keys has permits | 10000 | 1 | {t:.1} | {:.1} | {:.2} |",
                fa + gc,
                t / (fa + gc)
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    benches(&mut c);
    c.final_summary();
    print_table();
}
