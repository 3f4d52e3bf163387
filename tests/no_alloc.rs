//! The selection hot path allocates nothing: a counting global allocator
//! watches 100,000 limiter-gated selections, outcome reports and skips, then
//! 100,000 leases through the gateway (the server's per-attempt path).
//! One test in this file, because the counter is process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on bad setup
#![allow(unsafe_code)] // a GlobalAlloc impl is unsafe by definition; it only forwards to System

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use proxypal::LimitedPool;
use proxypal::gateway::lease::{Tried, try_lease};
use proxypal::gateway::{Gateway, GatewayConfig};
use proxypal::keypool::{KeySpec, Outcome};
use proxypal::limiter::{KeyQuota, Limits};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Only the test's own thread counts: libtest's threads (output capture,
    /// the slow-test timer) allocate whenever they like, and made the count
    /// fail now and then under `cargo test --workspace`.
    static THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether an allocation now is one the test counts.
fn counted() -> bool {
    COUNTING.load(Ordering::Relaxed) && THIS_THREAD.try_with(std::cell::Cell::get).unwrap_or(false)
}
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn selection_gated_by_the_limiter_does_not_allocate() {
    THIS_THREAD.with(|t| t.set(true));
    let keys: Vec<KeySpec> = (0..64).map(|i| KeySpec::new(format!("nvapi-alloc-test-{i:032}"))).collect();
    let pool = LimitedPool::new(keys, KeyQuota::new(u32::MAX, 1_000).unwrap()).unwrap();
    // Half of the keys cool down, so selections also take the skip path.
    for i in 0..32 {
        let k = pool.pool().select_with(|c| c.index == i * 2).unwrap();
        pool.pool().report(&k, Outcome::RateLimited { retry_after: None });
    }
    // Warm up (lazy statics, thread-locals of arc-swap and quanta).
    for _ in 0..1_000 {
        let k = pool.select().unwrap();
        pool.pool().report(&k, Outcome::Success);
    }

    COUNTING.store(true, Ordering::SeqCst);
    let mut selected = 0usize;
    for _ in 0..100_000 {
        if let Some(k) = pool.select() {
            pool.pool().report(&k, Outcome::Success);
            selected += 1;
        }
    }
    COUNTING.store(false, Ordering::SeqCst);

    assert_eq!(selected, 100_000);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "allocations on the selection path");

    // The gateway's lease: round robin, tried keys, permit, and the lease's
    // Authorization value and metric handles (reference-counted clones).
    let keys: Vec<KeySpec> = (0..64).map(|i| KeySpec::new(format!("nvapi-alloc-test-{i:032}"))).collect();
    let mut config = GatewayConfig::with_keys(keys);
    // Every kind of window at once, so that the grant, the concurrency slot and
    // the token settlement are all on the measured path; limits far above the
    // load, so the rolling logs fill and merge (their steady state).
    config.providers[0].limits = Limits {
        requests_per_minute: Some(u64::MAX / 2),
        requests_per_day: Some(u64::MAX / 2),
        day_reset: Some("00:00 UTC".parse().unwrap()),
        tokens_per_minute: Some(u64::MAX / 2),
        max_concurrent: Some(1_000),
        ..Limits::nvidia_free_tier()
    };
    let gateway = Gateway::new(config, &mut prometheus_client::registry::Registry::default()).unwrap();
    let mut tried = Tried::default();
    tried.push(0, 3);
    tried.push(0, 5);
    let provider = gateway.provider("default").unwrap();
    let keys = provider.keys();
    for _ in 0..1_000 {
        let lease = try_lease(keys, 0, &tried, 500).unwrap();
        keys.report(&lease.selected, Outcome::Success);
    }
    COUNTING.store(true, Ordering::SeqCst);
    let mut leased = 0usize;
    for _ in 0..100_000 {
        if let Some(lease) = try_lease(keys, 0, &tried, 500) {
            keys.report(&lease.selected, Outcome::Success);
            leased += 1;
        }
    }
    COUNTING.store(false, Ordering::SeqCst);
    assert_eq!(leased, 100_000);
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0, "allocations on the gateway's lease path");
}
