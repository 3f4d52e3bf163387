//! Metrics, request ids and JSON logs, against the simulated upstream.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use proxypal_nim_sim::{Fault, FaultTarget};
use proxypal_nim_sim::{SimConfig, SimServer, generate_test_keys};
use serde_json::Value;

use crate::common::{self, Rig, bounded, chat_request, masked, send};

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_attempts_and_retries_by_masked_key() {
    bounded(async {
        let rig = Rig::start(2, |s| s, |_| {}).await;
        // Key 0 answers 429 once: the request fails over to key 1.
        rig.sim.push_fault(Fault::rate_limited(), FaultTarget::Key(rig.keys[0].clone()));
        for _ in 0..3 {
            assert_eq!(rig.chat().await.status, StatusCode::OK);
        }
        let reply = rig.get("/metrics", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        let text = reply.text();
        let (k0, k1) = (masked(&rig.keys[0]), masked(&rig.keys[1]));
        // Request 1: key 0 (429) then key 1. Requests 2 and 3: round robin from the cursor.
        assert_eq!(
            metric(
                &text,
                &format!(r#"proxypal_upstream_attempts_total{{provider="default",key="{k0}",result="rate_limited"}}"#)
            ),
            1.0
        );
        assert_eq!(metric(&text, r#"proxypal_retries_total{reason="rate_limited"}"#), 1.0);
        let served = metric(&text, &format!(r#"proxypal_requests_total{{provider="default",key="{k0}",status="2xx"}}"#))
            + metric(&text, &format!(r#"proxypal_requests_total{{provider="default",key="{k1}",status="2xx"}}"#));
        assert_eq!(served, 3.0);
        assert_eq!(metric(&text, r#"proxypal_keys{provider="default",state="cooling_down"}"#), 1.0);
        assert_eq!(metric(&text, "proxypal_upstream_latency_seconds_count"), 4.0, "four attempts");
        assert_eq!(metric(&text, "proxypal_proxy_overhead_seconds_count"), 3.0);
        assert_eq!(metric(&text, "proxypal_open_streams"), 0.0);
        for key in &rig.keys {
            assert!(!text.contains(key.as_str()), "a full key in /metrics");
        }
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_client_token_when_tokens_are_set() {
    bounded(async {
        let token = "client-token-for-metrics-0001";
        let rig =
            Rig::start(1, |s| s, |c| c.auth.tokens = vec![proxypal_server::config::Secret::new(token)]).await;
        assert_eq!(rig.get("/metrics", &[]).await.status, StatusCode::UNAUTHORIZED);
        let auth = format!("Bearer {token}");
        assert_eq!(rig.get("/metrics", &[("authorization", &auth)]).await.status, StatusCode::OK);
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_accepted_or_generated_returned_and_forwarded() {
    bounded(async {
        let rig = Rig::start(1, |s| s, |_| {}).await;
        let given =
            send(&rig.http, chat_request(rig.server.addr(), false, &[("x-request-id", "abc-123")])).await;
        assert_eq!(given.headers["x-request-id"], "abc-123");
        let seen = rig.sim.stats().last_request_headers.unwrap();
        assert_eq!(seen["x-request-id"], "abc-123", "forwarded upstream");

        let a = rig.chat().await.headers["x-request-id"].to_str().unwrap().to_owned();
        let b = rig.get("/health", &[]).await.headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(a.starts_with("pp-") && b.starts_with("pp-") && a != b, "{a} {b}");
        // A silly id is replaced, not echoed.
        let long = "x".repeat(300);
        let replaced =
            send(&rig.http, chat_request(rig.server.addr(), false, &[("x-request-id", &long)])).await;
        assert!(replaced.headers["x-request-id"].to_str().unwrap().starts_with("pp-"));
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_request_span() {
    bounded(async {
        let keys = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let dir = std::env::temp_dir().join(format!("proxypal-jsonlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxypal.yaml");
        let keys_yaml: String = keys.iter().map(|k| format!("  - {k}\n")).collect();
        std::fs::write(
            &path,
            format!("listen: 127.0.0.1:0\nupstream:\n  base_url: {}\nkeys:\n{keys_yaml}log:\n  level: debug\n  format: json\nshutdown_grace: 1s\n", sim.base_url()),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_proxypal-server"))
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines: Vec<Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: std::net::SocketAddr = loop {
            let line = rx.recv_timeout(Duration::from_secs(10)).expect("a log line");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let message = v["fields"]["message"].as_str().unwrap_or_default().to_owned();
            lines.push(v);
            if let Some(rest) = message.strip_prefix("listening on ") {
                break rest.parse().unwrap();
            }
            assert!(Instant::now() < deadline);
        };
        let http = common::http_client();
        let reply = send(&http, chat_request(addr, false, &[("x-request-id", "json-req-1")])).await;
        assert_eq!(reply.status, StatusCode::OK);
        drop(http);
        assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
        let status = child.wait().unwrap();
        assert!(status.success(), "{status:?}");
        reader.join().unwrap();
        for line in rx.try_iter() {
            lines.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
        }
        let in_span = lines
            .iter()
            .find(|v| v["span"]["id"] == "json-req-1")
            .unwrap_or_else(|| panic!("no event in the request span: {lines:?}"));
        assert_eq!(in_span["span"]["name"], "request");
        let key = in_span["span"]["key"].as_str().unwrap();
        assert!(keys.iter().any(|k| masked(k) == key), "span key {key} is a masked label");
        let all = serde_json::to_string(&lines).unwrap();
        assert!(keys.iter().all(|k| !all.contains(k.as_str())), "a full key in the logs");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}
