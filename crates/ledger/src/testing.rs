//! A PostgreSQL server of a test's own (feature `testing`): `initdb` into a
//! temporary directory, started with `pg_ctl` on a free 127.0.0.1 port, so
//! a test may stop and restart it without disturbing anyone else's server.
//!
//! The binaries are looked up on `PATH`, else in the highest
//! `/usr/lib/postgresql/*/bin`. Without them [`Postgres::new`] says the test
//! is skipped and why and returns `None`; under `CI=true` that is a panic
//! (a skip in CI is a failure). `initdb` refuses to run as root, so as root
//! the server runs as the `postgres` OS user (`runuser`, else `su`), in a
//! directory handed to that user.
//!
//! This is test support: a server that cannot be set up is a panic with
//! the server's log in the message.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a start or stop may take.
const WAIT: Duration = Duration::from_secs(30);

/// A PostgreSQL server on 127.0.0.1 with trust authentication (user
/// `postgres`, database `postgres`). Dropping it stops the server and
/// deletes its data.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    root: PathBuf,
    port: u16,
    run_as: RunAs,
    running: bool,
}

/// How the server's commands are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunAs {
    /// As the current (non-root) user.
    Me,
    /// `runuser -u postgres -- …` (we are root).
    Runuser,
    /// `su postgres -s /bin/sh -c '…'` (we are root, without runuser).
    Su,
}

impl Postgres {
    /// Creates and starts one, or returns `None` after printing
    /// `skipped: <reason>` when PostgreSQL is not installed (a panic under
    /// `CI=true`). `test` names the caller in those messages.
    pub fn new(test: &str) -> Option<Self> {
        let Some(bin) = find_bin_dir() else {
            return skip(
                test,
                "PostgreSQL's initdb, pg_ctl and postgres are neither on PATH nor in /usr/lib/postgresql/*/bin",
            );
        };
        let run_as = if is_root() {
            if !succeeds(Command::new("id").args(["-u", "postgres"])) {
                return skip(test, "running as root and there is no `postgres` OS user to run initdb as");
            }
            if succeeds(Command::new("runuser").arg("--help")) { RunAs::Runuser } else { RunAs::Su }
        } else {
            RunAs::Me
        };
        let root = unique_dir();
        if let Err(e) = std::fs::create_dir_all(root.join("sockets")) {
            panic!("{test}: cannot create {}: {e}", root.display());
        }
        let mut pg = Self { bin, root, port: 0, run_as, running: false };
        if run_as != RunAs::Me {
            let ok = succeeds(Command::new("chown").args(["-R", "postgres:"]).arg(&pg.root));
            assert!(ok, "{test}: cannot chown {} to postgres", pg.root.display());
        }
        let data = pg.data();
        let out = pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--no-locale".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(out.status.success(), "{test}: initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // A free port can be taken between finding and binding it: try a few.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.try_start().is_ok() {
                return Some(pg);
            }
        }
        panic!("{test}: PostgreSQL did not start: {}", pg.log());
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it (`pg_ctl stop -m fast`: clients are disconnected) and waits
    /// until it is down.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let out = self.pg_ctl("fast");
        assert!(out.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
    }

    /// Starts it again, same port and data, and waits until it accepts
    /// connections.
    pub fn start(&mut self) {
        if self.running {
            return;
        }
        if let Err(e) = self.try_start() {
            panic!("PostgreSQL did not restart on port {}: {e}\n{}", self.port, self.log());
        }
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -c port={} -c unix_socket_directories='{}' -c fsync=off",
            self.port,
            self.root.join("sockets").display()
        );
        let (data, log) = (self.data(), self.root.join("log"));
        let args: [&std::ffi::OsStr; 10] = [
            "-D".as_ref(),
            data.as_os_str(),
            "-l".as_ref(),
            log.as_os_str(),
            "-o".as_ref(),
            options.as_ref(),
            "-w".as_ref(),
            "-t".as_ref(),
            "30".as_ref(),
            "start".as_ref(),
        ];
        let out = self.run("pg_ctl", &args);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        self.running = true;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("nothing listens on 127.0.0.1:{}", self.port))
    }

    fn pg_ctl(&self, mode: &str) -> Output {
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("log")).unwrap_or_default()
    }

    /// Runs one of the server's binaries as the right user, from its
    /// directory (the test's working directory may be closed to `postgres`).
    fn run(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        let program = self.bin.join(program);
        let mut command = match self.run_as {
            RunAs::Me => Command::new(&program),
            RunAs::Runuser => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&program);
                c
            }
            RunAs::Su => {
                let line = std::iter::once(program.as_os_str())
                    .chain(args.iter().copied())
                    .map(|arg| shell_quote(&arg.to_string_lossy()))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut c = Command::new("su");
                c.args(["postgres", "-s", "/bin/sh", "-c", &line]);
                c
            }
        };
        if self.run_as != RunAs::Su {
            command.args(args);
        }
        match command.current_dir(&self.root).output() {
            Ok(out) => out,
            Err(e) => panic!("cannot run {}: {e}", program.display()),
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl("immediate");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `None`, said why on stderr; a panic under `CI=true`.
fn skip(test: &str, reason: &str) -> Option<Postgres> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {reason}, and CI must run the PostgreSQL tests"
    );
    eprintln!("skipped: {reason} ({test})");
    None
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`: one on `PATH`,
/// else the highest-numbered `/usr/lib/postgresql/<version>/bin`.
fn find_bin_dir() -> Option<PathBuf> {
    let complete = |dir: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|bin| dir.join(bin).is_file());
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|dir| complete(dir)) {
            return Some(dir);
        }
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql").ok()?;
    versions
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: f64 = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| complete(bin))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn succeeds(command: &mut Command) -> bool {
    command.output().is_ok_and(|out| out.status.success())
}

fn free_port() -> u16 {
    match TcpListener::bind("127.0.0.1:0").and_then(|listener| listener.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("no free port on 127.0.0.1: {e}"),
    }
}

/// A new directory name under the temp dir, unique in this process and
/// across processes.
fn unique_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "proxypal-ledger-pg-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// `s` quoted for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}
