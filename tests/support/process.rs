//! Running the `sluice` binary in tests: a child that dies with the test, its log, tools.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Whether `tool` is on the PATH. Missing, it fails the test under CI (any non-empty `CI`:
/// `.ci/run` installs every tool the tests use) and skips it elsewhere, saying so.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    available(&format!("{tool} is not installed"), ok)
}

/// The one rule for what a test needs from the machine (a tool, IPv6 loopback): when it is
/// missing, `false` (the test returns, skipped) outside CI; under any non-empty `CI`, a panic.
pub fn available(missing: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{missing}: required in CI (.ci/run installs what the tests need)");
    }
    eprintln!("skipping: {missing}");
    false
}

/// `sluice --log-format json run --config <path> <args>`, its stderr piped for
/// `bound_addresses`; started and killed with the test.
pub fn sluice_run(path: &std::path::Path, args: &[&str]) -> Running {
    sluice_run_command(path, args).spawn_running()
}

/// The same command, not started yet (to set its environment first).
pub fn sluice_run_command(path: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["--log-format", "json", "run", "--config"])
        .arg(path)
        .args(args)
        .stderr(std::process::Stdio::piped());
    cmd
}

pub trait SpawnRunning {
    fn spawn_running(&mut self) -> Running;
}

impl SpawnRunning for Command {
    fn spawn_running(&mut self) -> Running {
        Running(self.spawn().expect("the command starts"))
    }
}

/// Send `sig` (`"TERM"`, `"HUP"`, ...) to a process.
pub fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Wait for a child to exit within `limit`; its status.
pub fn exits_within(child: &mut Running, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "process still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed when the test ends, even if the test panics first.
pub struct Running(pub Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A child's JSON log, read on a thread as it is written (so the child never blocks on a
/// full pipe): tests wait for a line instead of sleeping.
pub struct Log {
    seen: Arc<(Mutex<String>, Condvar)>,
    reader: std::thread::JoinHandle<()>,
}

impl Log {
    fn follow(mut stderr: BufReader<ChildStderr>, start: String) -> Log {
        let seen = Arc::new((Mutex::new(start), Condvar::new()));
        let writer = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut l = String::new();
            while stderr.read_line(&mut l).unwrap_or(0) > 0 {
                writer.0.lock().unwrap().push_str(&l);
                writer.1.notify_all();
                l.clear();
            }
        });
        Log { seen, reader }
    }

    /// Wait until a line containing `needle` has been logged; panics after `limit`.
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut text = self.seen.0.lock().unwrap();
        while !text.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle} within {limit:?}:\n{text}"
            );
            text = self.seen.1.wait_timeout(text, left).unwrap().0;
        }
    }

    /// The whole log, once the child has exited (its stderr closed).
    pub fn join(self) -> std::thread::Result<String> {
        self.reader.join()?;
        let text = self.seen.0.lock().unwrap();
        Ok(text.clone())
    }
}

/// Wait until a `sluice run --log-format json` child has logged its bound edge and admin
/// addresses, then keep following its log.
pub fn bound_addresses(child: &mut Child) -> (String, String, Log) {
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (mut edge, mut admin) = (None, None);
    let mut all = String::new();
    let mut line = String::new();
    while (edge.is_none() || admin.is_none()) && stderr.read_line(&mut line).unwrap() > 0 {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "listening" {
            edge = v["address"].as_str().map(str::to_owned);
        }
        if v["message"] == "admin API listening" {
            admin = v["address"].as_str().map(str::to_owned);
        }
        all.push_str(&line);
        line.clear();
    }
    (
        edge.expect("sluice logs the bound edge address"),
        admin.expect("sluice logs the bound admin address"),
        Log::follow(stderr, all),
    )
}
