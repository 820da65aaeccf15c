//! Running the `sluice` binary in tests: a child that dies with the test, its log, tools.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command};

pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is required in CI (.ci/run installs it)");
    }
    if !ok {
        eprintln!("skipping: {tool} is not installed");
    }
    ok
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

/// Wait until a `sluice run --log-format json` child has logged its bound edge and admin
/// addresses, then keep draining its stderr (so it never blocks on a full pipe); the handle
/// returns the whole log once the child exits.
pub fn bound_addresses(child: &mut Child) -> (String, String, std::thread::JoinHandle<String>) {
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
    let log = std::thread::spawn(move || {
        let mut l = String::new();
        while stderr.read_line(&mut l).unwrap_or(0) > 0 {
            all.push_str(&l);
            l.clear();
        }
        all
    });
    (
        edge.expect("sluice logs the bound edge address"),
        admin.expect("sluice logs the bound admin address"),
        log,
    )
}
