//! Quota state across restarts: what the windows counted, cooldowns and
//! disabled keys come back after a clean restart and after a crash (`kill
//! -9`), and a file that is not ours stops the start, untouched.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use proxypal_nim_sim::{SimConfig, SimRateLimit, SimServer, generate_test_keys};
use proxypal_server::StartError;

use crate::common::{bounded, chat_request, http_client, proxy_config, send};
use crate::hardening_support::{Binary, TempDir, free_port};

const WINDOW: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_what_the_windows_counted() {
    bounded(async {
        let dir = TempDir::new("state-restart");
        let keys = generate_test_keys(1);
        let sim = SimServer::start(
            SimConfig::default()
                .with_keys(keys.clone())
                .with_rate_limit(SimRateLimit::RollingWindow { limit: 5, window: WINDOW }),
        )
        .unwrap();
        let mut config = proxy_config(&sim, &keys);
        config.rate_limit.requests_per_minute = Some(5);
        config.retry.queue_timeout = Duration::from_millis(300);
        config.state.path = Some(dir.path("state.db"));
        let http = http_client();

        let server = proxypal_server::start(&config, false).await.unwrap();
        for _ in 0..5 {
            assert_eq!(send(&http, chat_request(server.addr(), false, &[])).await.status, StatusCode::OK);
        }
        server.shutdown().await;

        // A new process would start with empty windows and send a 6th request
        // the upstream refuses; the restored one answers itself.
        let server = proxypal_server::start(&config, false).await.unwrap();
        let reply = send(&http, chat_request(server.addr(), false, &[])).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        assert_eq!(sim.stats().total_rate_limited(), 0, "no 6th request reached the upstream");
        let stats = send(&http, crate::hardening_support::get_request(server.addr(), "/stats")).await.json();
        let minute = &stats["keys"][0]["limits"][0];
        assert_eq!((minute["used"].as_u64(), minute["remaining"].as_u64()), (Some(5), Some(0)), "{stats}");
        server.shutdown().await;

        // Nothing of the key itself is in the file.
        let bytes = std::fs::read(dir.path("state.db")).unwrap();
        let needle = keys[0].as_bytes();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the key is in the state file");
        let tail = &keys[0].as_bytes()[keys[0].len() - 8..];
        assert!(!bytes.windows(tail.len()).any(|w| w == tail), "part of the key is in the state file");
    })
    .await;
}

fn yaml(addr: SocketAddr, sim: &str, keys: &[String], state: &std::path::Path) -> String {
    let keys: String = keys.iter().map(|k| format!("  - {k}\n")).collect();
    format!(
        "listen: {addr}\nupstream: {{ base_url: {sim} }}\nkeys:\n{keys}rate_limit: {{ requests_per_minute: 5 }}\nretry: {{ queue_timeout: 300ms }}\nstate: {{ path: {} }}\nauth: {{ allow_unauthenticated: true }}\nshutdown_grace: 1s\n",
        state.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_windows_err_on_the_safe_side_and_disabled_keys_stay_disabled() {
    bounded(async {
        let dir = TempDir::new("state-crash");
        let keys = generate_test_keys(2);
        let sim = SimServer::start(
            SimConfig::default().with_keys(keys.clone()).with_forbidden_keys(vec![keys[1].clone()]),
        )
        .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path("proxypal.yaml");
        std::fs::write(&config, yaml(addr, &sim.base_url(), &keys, &dir.path("state.db"))).unwrap();
        let http = http_client();

        let mut bin = Binary::start(&config, addr).await;
        // Key 1 is refused by the upstream (403): disabled. Key 0 serves two requests.
        for _ in 0..2 {
            assert_eq!(send(&http, chat_request(addr, false, &[])).await.status, StatusCode::OK);
        }
        // Let the saver write (every second), then crash.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        bin.signal("KILL");
        assert!(bin.wait_exit(Duration::from_secs(5)).await.is_some());

        let before = sim.stats().key(&keys[0]).ok;
        let bin = Binary::start(&config, addr).await;
        assert!(bin.wait_log("unclean stop", Duration::from_secs(2)).await, "{}", bin.log());
        // Grants after the last save may be lost: the minute counts as spent.
        let reply = send(&http, chat_request(addr, false, &[])).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        assert_eq!(sim.stats().key(&keys[0]).ok, before, "nothing sent on a possibly spent window");
        let stats = send(&http, crate::hardening_support::get_request(addr, "/stats")).await.json();
        assert_eq!(stats["keys"][1]["state"], "disabled", "{stats}");
        bin.signal("TERM");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_ours_stops_the_start_and_is_left_alone() {
    bounded(async {
        let dir = TempDir::new("state-foreign");
        let keys = generate_test_keys(1);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let mut config = proxy_config(&sim, &keys);

        let garbage = dir.path("notes.txt");
        std::fs::write(&garbage, "my notes, not a database\n".repeat(100)).unwrap();
        config.state.path = Some(garbage.clone());
        let err =
            proxypal_server::start(&config, false).await.expect_err("a foreign file must stop the start");
        assert!(matches!(err, StartError::State(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&garbage.display().to_string()) && msg.contains("move the file away"), "{msg}");
        assert_eq!(std::fs::read_to_string(&garbage).unwrap(), "my notes, not a database\n".repeat(100));

        // Another program's SQLite database: refused too, its tables untouched.
        let other = dir.path("other.db");
        {
            let conn = rusqlite::Connection::open(&other).unwrap();
            conn.execute_batch("CREATE TABLE invoices (id INTEGER); INSERT INTO invoices VALUES (7);")
                .unwrap();
        }
        config.state.path = Some(other.clone());
        let msg = proxypal_server::start(&config, false).await.expect_err("refused").to_string();
        assert!(msg.contains("invoices"), "{msg}");
        let conn = rusqlite::Connection::open(&other).unwrap();
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 1, "nothing was added to another program's database");

        // The binary exits 64 (a configuration problem) naming the file.
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = dir.path("proxypal.yaml");
        std::fs::write(&path, yaml(addr, &sim.base_url(), &keys, &garbage)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxypal-server"))
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("notes.txt"));
    })
    .await;
}
