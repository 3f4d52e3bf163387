//! A `redis-server` of a test's own, on a free loopback port (never the
//! machine's Redis, which other tests may use), for this crate's tests and
//! the server's. Without `redis-server` a test says it is skipped and why;
//! under `CI=true` that is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` of this test: killed when dropped.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Redis {
    /// Starts one, or `None` (skipped, said why) without `redis-server`.
    pub fn start(test: &str) -> Option<Self> {
        Self::start_with(test, |_| Vec::new())
    }

    /// Starts one that also serves TLS: `(redis, its rediss:// URL, the CA's
    /// PEM)`, with a CA and a server certificate for 127.0.0.1 made by
    /// `openssl`; `None` (skipped, said why) without `redis-server`.
    pub fn start_tls(test: &str) -> Option<(Self, String, Vec<u8>)> {
        if Command::new("openssl").arg("version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: openssl is not installed, and CI must run the TLS test"
            );
            eprintln!("SKIPPED {test}: openssl is not installed (apt-get install openssl)");
            return None;
        }
        let tls_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let certs =
            std::env::temp_dir().join(format!("proxypal-redis-tls-{}-{tls_port}", std::process::id()));
        std::fs::create_dir_all(&certs).unwrap();
        let openssl = |args: &[&str]| {
            let ok =
                Command::new("openssl").args(args).current_dir(&certs).output().unwrap().status.success();
            assert!(ok, "{test}: openssl {args:?} failed");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=proxypal-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        let dir = certs.clone();
        let redis = Self::start_with(test, move |_| {
            let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
            vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                file("server.crt"),
                "--tls-key-file".into(),
                file("server.key"),
                "--tls-ca-cert-file".into(),
                file("ca.crt"),
                "--tls-auth-clients".into(),
                "no".into(),
            ]
        })?;
        let ca = std::fs::read(certs.join("ca.crt")).unwrap();
        Some((redis, format!("rediss://127.0.0.1:{tls_port}/0"), ca))
    }

    fn start_with(test: &str, extra: impl Fn(u16) -> Vec<String>) -> Option<Self> {
        if Command::new("redis-server").arg("--version").output().is_err() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: redis-server is not installed, and CI must run the Redis tests"
            );
            eprintln!("SKIPPED {test}: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = std::env::temp_dir().join(format!("proxypal-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let child = spawn(port, &dir, &extra(port));
            let mut redis = Self { child, port, dir };
            if redis.wait_ready() {
                return Some(redis);
            }
            let _ = redis.child.kill(); // the port was taken meanwhile: another one
        }
        panic!("{test}: redis-server did not start");
    }

    pub fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG") {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("-CONT"); // a frozen one cannot die otherwise
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Redis {
    /// Kills it (SIGKILL) and waits for it to go.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal("-CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again, empty, on the same port (after [`kill`](Self::kill)).
    pub fn restart_empty(&mut self) {
        for _ in 0..50 {
            self.child = spawn(self.port, &self.dir, &[]);
            if self.wait_ready() {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}", self.port);
    }
}

/// A `redis-server` on 127.0.0.1:`port` keeping nothing on disk (its
/// working folder `dir`), with `extra` arguments.
fn spawn(port: u16, dir: &std::path::Path, extra: &[String]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}
