//! Another Rust service using `proxypal-keypool` + `proxypal-limiter` directly
//! to spread its own API calls over several keys — no proxy involved.
//!
//! ```sh
//! cargo run --example embed_keypool
//! ```
//!
//! The "API call" here is a stand-in that fails now and then the way NVIDIA's
//! API does (a 429 for one key, a 401 for a revoked key), so the example runs
//! anywhere. Swap `call_api` for your HTTP client.

use std::time::{Duration, Instant};

use proxypal::LimitedPool;
use proxypal::keypool::{KeySpec, KeyStatus, Outcome, RateOverride};
use proxypal::limiter::KeyQuota;

/// What the upstream answered (a stand-in for an HTTP status).
enum Answer {
    Ok,
    RateLimited,
    Unauthorized,
}

/// A pretend API: the key named "revoked" is rejected, and the third call on
/// "busy" is rate-limited.
fn call_api(key_name: Option<&str>, calls_on_this_key: u64) -> Answer {
    match key_name {
        Some("revoked") => Answer::Unauthorized,
        Some("busy") if calls_on_this_key == 3 => Answer::RateLimited,
        _ => Answer::Ok,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keys would come from your config or secret store; these are fake.
    let keys = vec![
        KeySpec::new("nvapi-example-0000000000000000000000000001").with_name("primary"),
        KeySpec::new("nvapi-example-0000000000000000000000000002").with_name("busy"),
        KeySpec::new("nvapi-example-0000000000000000000000000003").with_name("revoked"),
        // A key with its own, higher limit.
        KeySpec::new("nvapi-example-0000000000000000000000000004")
            .with_name("paid")
            .with_rate(RateOverride { requests_per_minute: Some(1200), burst: None }),
    ];
    // 600 requests/minute per key (one every ~100 ms), burst 1: no rolling minute
    // ever carries more than 600 per key.
    let pool = LimitedPool::new(keys, KeyQuota::new(600, 1)?)?;

    let started = Instant::now();
    let mut done = 0;
    let mut calls = 0;
    while done < 40 {
        let Some(key) = pool.select() else {
            // Every key is out of permits (or resting): wait for the next one.
            let wait = pool.time_to_permit().unwrap_or(Duration::from_millis(10));
            std::thread::sleep(wait.max(Duration::from_millis(1)));
            continue;
        };
        calls += 1;
        // key.key().secret().expose() is what goes into the Authorization header;
        // key.key() itself prints masked, so it is safe to log.
        match call_api(key.key().name(), key.key().stats().requests) {
            Answer::Ok => {
                pool.pool().report(&key, Outcome::Success);
                done += 1;
            }
            Answer::RateLimited => {
                println!("{} was rate limited; it rests and the next call goes elsewhere", key.key());
                pool.pool().report(&key, Outcome::RateLimited { retry_after: None });
            }
            Answer::Unauthorized => {
                println!("{} was rejected; disabling it", key.key());
                pool.pool().report(&key, Outcome::AuthFailed);
            }
        }
    }

    println!(
        "\n40 successful calls in {:.2} s ({calls} attempts). Per key:",
        started.elapsed().as_secs_f64()
    );
    for k in pool.pool().snapshot() {
        let state = match k.status {
            KeyStatus::Ready => "ready".to_owned(),
            KeyStatus::CoolingDown { remaining, reason } => {
                format!("cooling down {:.0} s ({})", remaining.as_secs_f64(), reason.as_str())
            }
            KeyStatus::Disabled => "disabled".to_owned(),
        };
        println!(
            "  {:<20} {:<8} requests {:>3}  successes {:>3}  errors {}  rate limited {}  — {state}",
            k.label,
            k.name.as_deref().unwrap_or("-"),
            k.counters.requests,
            k.counters.successes,
            k.counters.errors,
            k.counters.rate_limited,
        );
    }
    Ok(())
}
