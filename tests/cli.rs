//! The `sluice` binary as a user runs it: `check` on good and bad configs, and `run` with real
//! clients (openssl s_client, curl) and SIGTERM.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::process::{bound_addresses, exits_within, have, signal, sluice_run, Running};
use support::TaggedBackend;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn check(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn check_accepts_the_shipped_configs() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    for entry in std::fs::read_dir(conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out) = check(&path);
            assert_eq!(code, 0, "{}: {out}", path.display());
            assert!(out.contains(": ok ("), "{out}");
        }
    }
}

#[test]
fn check_reports_every_error_with_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[[listener]]
name = "edge"
address = "127.0.0.1:0"
hello_timeout = "ten seconds"

[[route]]
name = "clients"
pool = "client"

[[route]]
name = "tunnels"
alpn = ["teleport-reversetunnel"]
pool = "tunnel"

[pool.client]
backends = ["127.0.0.1:3080"]
balance = "fastest"
"#,
    )
    .unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 1, "{out}");
    let p = path.display().to_string();
    for expected in [
        format!("{p}:4: listener[0].hello_timeout: `ten seconds` is not a duration"),
        format!("{p}:10: route[1]: route `tunnels` can never match: the earlier catch-all route `clients`"),
        format!("{p}:13: route[1].pool: no pool is named `tunnel` — use one of: client"),
        format!("{p}:17: pool.client.balance: unknown balancer `fastest` — use one of"),
    ] {
        assert!(out.contains(&expected), "missing `{expected}` in:\n{out}");
    }
    assert_eq!(out.lines().count(), 4, "{out}");

    // A TOML-level problem (unknown key) names its line and key too.
    std::fs::write(
        &path,
        "[[listener]]\nname = \"edge\"\nadress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 1);
    assert!(
        out.starts_with(&format!("{p}:3: adress: unknown field `adress`")),
        "{out}"
    );
}

#[test]
fn check_reports_a_missing_file() {
    let (code, out) = check(std::path::Path::new("/nonexistent/sluice.toml"));
    assert_eq!(code, 1);
    assert!(
        out.contains("/nonexistent/sluice.toml: (file): cannot read"),
        "{out}"
    );
}

/// `sluice --help` says what each command does, each beside its own name: `check` validates,
/// `sleep` waits (their texts were once swapped onto one line).
#[test]
fn help_describes_each_command_on_its_own_line() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let line = |command: &str| {
        help.lines()
            .find(|l| l.trim_start().starts_with(&format!("{command} ")))
            .unwrap_or_else(|| panic!("no line for {command}: {help}"))
            .to_string()
    };
    assert!(line("check").contains("Validate a config"), "{help}");
    assert!(line("sleep").contains("Wait, then exit 0"), "{help}");
    assert!(!line("sleep").contains("Validate"), "{help}");
    for command in ["run", "heartbeat", "resources", "agents", "demo"] {
        assert!(
            line(command).len() > command.len() + 10,
            "{command} has no help: {help}"
        );
    }
}

/// `sluice run` as a process, with real clients, then SIGTERM.
#[test]
fn run_routes_openssl_and_curl_and_stops_on_sigterm() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tunnel, client) = rt.block_on(async {
        let any = "127.0.0.1:0".parse().unwrap();
        (
            TaggedBackend::start(
                "tunnel-proxy",
                any,
                &["teleport-reversetunnelv2", "teleport-reversetunnel"],
            )
            .await
            .unwrap(),
            TaggedBackend::start("client-proxy", any, &["http/1.1"])
                .await
                .unwrap(),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let text = sluice::demo::demo_config(0, "127.0.0.1:0", tunnel.address, client.address);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();

    let mut child = sluice_run(&path, &[]);
    let (edge, _admin, log) = bound_addresses(&mut child);
    let port = edge.rsplit(':').next().unwrap().to_owned();

    if have("openssl") {
        // Read openssl's first line as soon as it comes (stdin stays open so it does not
        // hang up first), then stop it: no fixed sleep, and room for a slow machine.
        let mut openssl = Running(
            Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &edge,
                    "-servername",
                    "tunnel.example.com",
                ])
                .args(["-alpn", "teleport-reversetunnel", "-quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = openssl.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("openssl printed the backend's greeting");
        drop(openssl);
        assert!(
            line.starts_with("tunnel-proxy alpn=teleport-reversetunnel sni=tunnel.example.com"),
            "openssl got: {line}"
        );
    }
    if have("curl") {
        let out = Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "20",
                &format!("https://localhost:{port}/"),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.starts_with("hello from client-proxy (alpn=http/1.1 sni=localhost)"),
            "curl got: {stdout}"
        );
    }

    // SIGTERM: drain (drain_delay 0s in this config) and exit 0.
    signal(child.id(), "TERM");
    let code = exits_within(&mut child, Duration::from_secs(10));
    assert!(code.success(), "exit status {code:?}");
    let log = log.join().unwrap();
    assert!(
        log.contains("\"route\":\"tunnels\""),
        "access log names the route:\n{log}"
    );
    assert!(log.contains("\"message\":\"drain 4/4: stopped\""), "{log}");
}

/// Out of file descriptors: accept fails with EMFILE; sluice backs off instead of spinning,
/// counts it, and serves again once descriptors free up.
#[test]
fn emfile_backs_off_and_recovers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(async {
        let b = support::RawBackend::start("b", false).await;
        b.address
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(
        &path,
        format!(
            r#"[admin]
address = "127.0.0.1:0"
[limits]
max_connections = 5000   # fits the limit at start; far above it once lowered to 64
[[listener]]
name = "edge"
address = "127.0.0.1:0"
[[route]]
name = "all"
pool = "p"
[pool.p]
backends = ["{backend}"]
"#
        ),
    )
    .unwrap();
    let mut child = Running(
        Command::new(BIN)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (edge, admin, log) = bound_addresses(&mut child);
    // The open-file limit drops under the running process (an operator's prlimit, or
    // descriptors taken by something else): accepts fail with EMFILE.
    if !have("prlimit") {
        return;
    }
    let lowered = Command::new("prlimit")
        .args(["--pid", &child.id().to_string(), "--nofile=64:64"])
        .status()
        .unwrap();
    assert!(lowered.success());
    let hello = sluice_core::hello::build::hello(Some("a.example.com"), &["h2"]);

    // Hold 60 relayed connections: 120 descriptors wanted, 64 allowed.
    let mut held = Vec::new();
    for _ in 0..60 {
        let mut s = std::net::TcpStream::connect(&edge).unwrap();
        s.write_all(&hello).unwrap();
        held.push(s);
    }
    log.wait_for("accept failed: out of resources", Duration::from_secs(20));
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks() - before;
    assert!(
        spent < 50,
        "sluice spun at EMFILE: {spent} ticks of CPU in 2 s"
    );
    drop(held);

    // Descriptors free again: a new connection is served.
    let served = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(mut s) = std::net::TcpStream::connect(&edge) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(&hello).is_ok() && {
            let mut buf = [0u8; 2];
            std::io::Read::read_exact(&mut s, &mut buf).is_ok() && &buf == b"b\n"
        }
    });
    assert!(served, "sluice serves again after EMFILE");

    let out = Command::new("curl")
        .args(["-s", &format!("http://{admin}/metrics")])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    let emfile = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("sluice_accept_errors_total{kind=\"emfile\",listener=\"edge\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(emfile.is_some_and(|n| n > 0.0), "{metrics}");
    // The admin API speaks h2c too.
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            &format!("http://{admin}/healthz"),
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200");
    // Two SIGINTs: the first starts the drain (drain_delay is 5 s), the second skips it;
    // sluice still exits 0.
    signal(child.id(), "INT");
    log.wait_for("\"signal\":\"SIGINT\"", Duration::from_secs(10));
    signal(child.id(), "INT");
    log.wait_for(
        "second signal: closing everything now",
        Duration::from_secs(10),
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "exit after SIGINT: {status:?}");
}

/// The README's first command: `sluice demo` starts the edge and both backends, prints the
/// commands to try, and splits traffic by ALPN.
#[test]
fn demo_splits_tunnels_from_clients() {
    // The demo runs in a directory of its own, as a user runs it with its log redirected there.
    let cwd = tempfile::tempdir().unwrap();
    let mut child = Running(
        Command::new(BIN)
            .args(["demo", "--port", "0", "--admin", "127.0.0.1:0"])
            .current_dir(cwd.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 {
        printed.push_str(&line);
        if line.contains("Ctrl-C stops everything") {
            break;
        }
        line.clear();
    }
    let edge: std::net::SocketAddr = printed
        .split("edge on ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("demo prints its edge address:\n{printed}"));
    assert!(printed.contains("openssl s_client"), "{printed}");
    assert!(printed.contains("curl -k https://localhost:"), "{printed}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tunnel =
            support::tls_greeting(edge, "tunnel.example.com", &["teleport-reversetunnel"]).await;
        assert_eq!(
            tunnel,
            "tunnel-proxy alpn=teleport-reversetunnel sni=tunnel.example.com"
        );
        let web = support::tls_http_get(edge, "localhost").await;
        assert!(web.starts_with("HTTP/1.1 200 OK"), "{web}");
        assert!(
            web.ends_with("hello from client-proxy (alpn=http/1.1 sni=localhost)\n"),
            "{web}"
        );
    });
    let admin: std::net::SocketAddr = printed
        .split("admin on http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("demo prints its admin address:\n{printed}"));
    assert!(
        printed.contains("a second Ctrl-C quits at once"),
        "{printed}"
    );

    // Files written beside the demo are not its config: no reload is attempted. Proving that
    // nothing happens takes a wait; it covers the watcher's longest debounce (1 s) twice.
    std::fs::write(cwd.path().join("demo.log"), "written by the user\n").unwrap();
    std::fs::write(cwd.path().join("notes.txt"), "x").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    rt.block_on(async {
        let metrics = support::scrape(admin).await;
        assert_eq!(
            metrics.value("sluice_config_last_reload_successful", &[]),
            1.0
        );
        for result in ["success", "failure", "unchanged"] {
            // Every result's series exists from the start, at 0.
            assert_eq!(
                metrics.get("sluice_config_reloads_total", &[("result", result)]),
                Some(0.0),
                "the demo reloaded ({result}) on a file it does not read"
            );
        }
    });

    // Ctrl-C with an idle tunnel open: the demo waits for it at most its 5 s drain_timeout,
    // then closes it at once (no close spread), and exits 0.
    let tunnel = rt.block_on(support::tls_session(
        edge,
        "tunnel.example.com",
        &["teleport-reversetunnel"],
    ));
    assert!(tunnel.1.starts_with("tunnel-proxy"), "{}", tunnel.1);
    signal(child.id(), "INT");
    let status = exits_within(&mut child, Duration::from_secs(8));
    assert!(status.success(), "{status:?}");
}

/// The shipped units are valid: `systemd-analyze verify` prints nothing (it only warns about
/// unknown keys) and exits 0. The binary path is pointed at the test build.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for unit in [
        "sluice.socket",
        "sluice-edge6.socket",
        "sluice-quic.socket",
        "sluice.service",
    ] {
        let text = std::fs::read_to_string(src.join(unit))
            .unwrap()
            .replace("/usr/local/bin/sluice", BIN);
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("sluice.socket"))
        .arg(dir.path().join("sluice-edge6.socket"))
        .arg(dir.path().join("sluice-quic.socket"))
        .arg(dir.path().join("sluice.service"))
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    // And its exposure, as `systemd-analyze security` rates it (offline: no running systemd).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(dir.path().join("sluice.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for sluice.service: ").nth(1))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(level <= 1.5, "exposure {level}:\n{text}");
}

/// The Kubernetes example: its embedded config passes `sluice check`, and the pod's grace
/// period covers preStop + drain_delay + drain_timeout + close_spread.
/// A kustomize layer of `deploy/kubernetes` (`base`, `overlays/NAME`): its manifests with
/// the base's (for the numbers and keys the tests look for), and its `sluice.toml`.
fn manifest(layer: &str) -> (String, String) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut yaml = String::new();
    for dir in [root.join("base"), root.join(layer)] {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for f in files {
            yaml.push_str(&std::fs::read_to_string(f).unwrap());
            yaml.push('\n');
        }
    }
    let toml = std::fs::read_to_string(root.join(layer).join("sluice.toml")).unwrap();
    (yaml, toml)
}

/// The base's and the QUIC overlay's configs pass `sluice check --no-resolve` (their backend
/// names resolve inside the cluster only), as `.ci/run` checks them.
#[test]
fn kubernetes_configs_pass_check_without_resolving() {
    for layer in ["base", "overlays/quic"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes")
            .join(layer)
            .join("sluice.toml");
        let out = Command::new(BIN)
            .args(["check", "--no-resolve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{layer}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The several-edges example: three replicas on the etcd store, a config `sluice check`
/// accepts once its cluster-only names and secrets are given.
#[test]
fn kubernetes_several_edges_example_is_valid() {
    let (yaml, toml) = manifest("overlays/multi-edge");
    assert!(yaml.contains("count: 3"), "three edges");
    let dir = support::secrets("kube-example-token-0123456789 name=agents\n");
    let d = dir.path().display().to_string();
    let toml = toml
        .replace("teleport-proxy.teleport.svc.cluster.local", "127.0.0.1")
        .replace("/etc/sluice-tls/tls.crt", &format!("{d}/cert.pem"))
        .replace("/etc/sluice-tls/tls.key", &format!("{d}/key.pem"))
        .replace("/etc/sluice-tokens/tokens", &format!("{d}/tokens"));
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &toml).unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 0, "{out}\n{toml}");
    let cfg = sluice::config::load(&path).unwrap();
    assert_eq!(cfg.store.kind, sluice::config::StoreKind::Etcd);
    assert_eq!(cfg.store.endpoints.len(), 3);
    assert_eq!(cfg.cluster.name, "prod");
    let apps = cfg
        .routes
        .iter()
        .find(|r| r.name == "apps")
        .expect("a resource route");
    match &apps.target {
        sluice::config::RouteTarget::Resource(r) => {
            assert_eq!(r.pick, sluice::config::Pick::Rendezvous)
        }
        _ => panic!("apps is a resource route"),
    }
    // The heartbeat port has its own readiness probe.
    assert!(yaml.contains("path: /readyz/heartbeat") || yaml.contains("healthcheck-path: /readyz"));
}

#[test]
fn kubernetes_example_is_valid_and_consistent() {
    let (yaml, toml) = manifest("base");
    // Backend names resolve inside the cluster only.
    let toml = toml.replace("teleport-proxy.teleport.svc.cluster.local", "127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &toml).unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 0, "{out}\n{toml}");

    let cfg = sluice::config::load(&path).unwrap();
    let number = |key: &str| -> u64 {
        yaml.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in the manifest"))
    };
    let grace = number("terminationGracePeriodSeconds:");
    let pre_stop: u64 = yaml
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("command: [\"/usr/local/bin/sluice\", \"sleep\", \"")
        })
        .and_then(|v| humantime::parse_duration(v.trim_end_matches("\"]")).ok())
        .map(|d| d.as_secs())
        .expect("preStop sleep");
    let lc = &cfg.lifecycle;
    let needed = pre_stop + (lc.drain_delay + lc.drain_timeout + lc.close_spread).as_secs();
    assert!(grace > needed, "grace {grace}s must exceed {needed}s");
    assert!(
        number("minReadySeconds:") >= lc.min_ready.as_secs(),
        "minReadySeconds covers min_ready"
    );
}

/// The builder stage's `COPY <src>... <dest>` lines (not `--from=` copies of an earlier
/// stage), as (source, path in the context) pairs, the way Docker places them.
fn dockerfile_copies(dockerfile: &str) -> Vec<(String, String)> {
    let mut copies = Vec::new();
    let builder = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("FROM "))
        .skip(1)
        .take_while(|l| !l.starts_with("FROM "));
    for args in builder.filter_map(|l| l.strip_prefix("COPY ")) {
        if args.starts_with("--") {
            continue;
        }
        let words: Vec<&str> = args.split_whitespace().collect();
        let (dest, sources) = words.split_last().expect("COPY has a destination");
        let dest = dest.trim_start_matches("./");
        for source in sources {
            let target = if dest.is_empty() || dest.ends_with('/') {
                format!("{dest}{source}")
            } else {
                dest.to_owned()
            };
            copies.push((source.to_string(), target));
        }
    }
    copies
}

/// No Docker daemon runs here, so the image is not built; instead the build context the
/// Dockerfile copies is rebuilt in a temporary directory and cargo must load it as the
/// locked workspace it builds from (a member left out, as `bench` once was, fails here).
#[test]
fn dockerfile_copies_a_complete_workspace() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copies = dockerfile_copies(&dockerfile);
    assert!(
        copies.iter().any(|(_, to)| to == "Cargo.lock"),
        "{copies:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    for (source, target) in &copies {
        let target = dir.path().join(target);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let status = Command::new("cp")
            .arg("-r")
            .arg(root.join(source))
            .arg(&target)
            .status()
            .unwrap();
        assert!(status.success(), "cp -r {source} {}", target.display());
    }
    // Only this platform's packages: the offline registry holds what was built here.
    let host = Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .expect("rustc -vV names the host");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--offline", "--format-version", "1"])
        .args(["--filter-platform", &host])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot load the Dockerfile's build context: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The kubelet refuses to start a `runAsNonRoot` pod whose image names its user (it cannot
/// tell a name's uid): the image's user is numeric and not root, and the manifest runs as it.
#[test]
fn image_user_is_numeric_and_the_manifest_runs_as_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image sets USER");
    let (uid, gid) = user.trim().split_once(':').unwrap_or((user.trim(), ""));
    let uid: u32 = uid
        .parse()
        .unwrap_or_else(|_| panic!("USER {user}: the image's user must be numeric"));
    assert_ne!(uid, 0, "the image runs as root");
    assert!(gid.is_empty() || gid.parse::<u32>().is_ok(), "USER {user}");
    let yaml =
        std::fs::read_to_string(root.join("deploy/kubernetes/base/deployment.yaml")).unwrap();
    assert!(
        yaml.contains("runAsNonRoot: true"),
        "the pod must refuse root"
    );
    let run_as = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("runAsUser:"))
        .and_then(|v| v.split('#').next()?.trim().parse::<u32>().ok());
    assert_eq!(run_as, Some(uid), "runAsUser matches the image's USER");
}

/// A config with one catch-all route `all` to pool `p` (one backend) and an admin API.
fn one_backend_config(dir: &std::path::Path, backend: std::net::SocketAddr) -> std::path::PathBuf {
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        support::one_pool_config(
            "127.0.0.1:0",
            "[lifecycle]\ndrain_delay = \"0s\"",
            &format!("backends = [\"{backend}\"]"),
        ),
    )
    .unwrap();
    path
}

/// One relayed connection (a tunnel hello, 10 more bytes, then EOF) and one refused one
/// (not TLS: no route takes it), through an edge at `edge`.
fn one_relayed_one_refused(edge: &str) -> (usize, usize) {
    let mut s = std::net::TcpStream::connect(edge).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = support::tunnel_hello();
    s.write_all(&hello).unwrap();
    s.write_all(b"0123456789").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer).unwrap();
    let sent = hello.len() + 10;
    assert_eq!(answer, format!("b\nb got {sent} bytes\n"));
    let mut plain = std::net::TcpStream::connect(edge).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain, &mut rest);
    assert!(rest.is_empty(), "a connection no route takes gets nothing");
    (sent, answer.len())
}

/// The access log, one line per connection, in both formats, with every field: id, client,
/// listener, SNI, ALPN, route, pool, backend, bytes each way, duration, end and detail.
#[test]
fn access_log_lines_carry_every_field_in_both_formats() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(async { support::RawBackend::start("b", false).await.address });
    let dir = tempfile::tempdir().unwrap();
    let path = one_backend_config(dir.path(), backend);

    // JSON: one object per line, the fields as keys.
    let mut child = sluice_run(&path, &[]);
    let (edge, _, log) = bound_addresses(&mut child);
    let (sent, received) = one_relayed_one_refused(&edge);
    log.wait_for("\"end\":\"not_tls\"", Duration::from_secs(10));
    signal(child.id(), "TERM");
    assert!(exits_within(&mut child, Duration::from_secs(20)).success());
    let text = log.join().unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.contains("sluice::access"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let (relayed, refused) = (&lines[0], &lines[1]);
    let expect = [
        ("listener", "edge"),
        ("sni", "agent.example.com"),
        ("alpn", "teleport-reversetunnel"),
        ("route", "all"),
        ("pool", "p"),
        ("end", "closed"),
        ("detail", ""),
    ];
    for (key, value) in expect {
        assert_eq!(relayed[key], value, "{key} in {relayed}");
    }
    assert_eq!(relayed["backend"], backend.to_string());
    assert_eq!(relayed["bytes_to_backend"], sent as u64);
    assert_eq!(relayed["bytes_to_client"], received as u64);
    assert!(relayed["duration_ms"].as_u64().is_some(), "{relayed}");
    assert!(relayed["client"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(relayed["conn"].as_u64().is_some(), "{relayed}");
    assert_ne!(
        relayed["conn"], refused["conn"],
        "each connection has its own id"
    );
    assert_eq!(refused["end"], "not_tls");
    assert_eq!(refused["route"], "none");
    assert_eq!(refused["backend"], "-");
    assert_eq!(refused["detail"], "no route matches this connection");

    // Text: the same fields as key=value.
    let mut child = Running(
        Command::new(BIN)
            .args(["--log-format", "text", "run", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let edge = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "sluice exited");
        if line.contains("listening") && line.contains("listener=edge") {
            let at = line.split("address=").nth(1).unwrap();
            break at.split_whitespace().next().unwrap().to_owned();
        }
    };
    let (sent, received) = one_relayed_one_refused(&edge);
    // A client whose ALPN carries a newline and terminal escapes: still one line, escaped.
    let evil = "h2\nconn=1 end=\"closed\" \u{1b}[31m\u{1b}]0;owned\u{7}";
    let mut s = std::net::TcpStream::connect(&edge).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&sluice_core::hello::build::hello(
        Some("evil.example.com"),
        &[evil],
    ))
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = std::io::Read::read_to_end(&mut s, &mut Vec::new());
    let mut access = Vec::new();
    while access.len() < 3 {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "sluice exited");
        if line.contains("sluice::access") {
            access.push(line.clone());
        }
    }
    // Every client-controlled value is a quoted, escaped string.
    for field in [
        "listener=\"edge\"".to_owned(),
        "sni=\"agent.example.com\"".to_owned(),
        "alpn=\"teleport-reversetunnel\"".to_owned(),
        "route=\"all\"".to_owned(),
        "pool=\"p\"".to_owned(),
        format!("backend=\"{backend}\""),
        format!("bytes_to_backend={sent}"),
        format!("bytes_to_client={received}"),
        "duration_ms=".to_owned(),
        "end=\"closed\"".to_owned(),
        "conn=".to_owned(),
        "client=127.0.0.1:".to_owned(),
    ] {
        assert!(access[0].contains(&field), "{field} in {}", access[0]);
    }
    assert!(access[1].contains("end=\"not_tls\""), "{}", access[1]);
    assert!(
        access[1].contains("detail=\"no route matches this connection\""),
        "{}",
        access[1]
    );
    let evil_line = &access[2];
    assert!(
        evil_line.contains("sni=\"evil.example.com\""),
        "{evil_line}"
    );
    assert!(
        evil_line.contains(r#"alpn="h2\nconn=1 end=\"closed\" \u{1b}[31m"#),
        "{evil_line}"
    );
    assert!(
        !evil_line.trim_end().contains('\n'),
        "one line: {evil_line}"
    );
    assert!(
        !evil_line.contains('\u{1b}'),
        "no raw escape: {evil_line:?}"
    );
    signal(child.id(), "TERM");
    assert!(exits_within(&mut child, Duration::from_secs(20)).success());
}

/// `sluice run` raises its soft open-file limit to the hard one (as HAProxy does), and the
/// default connection cap follows the raised limit.
#[test]
fn run_raises_the_open_file_limit_to_the_hard_limit() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = rt.block_on(async { support::RawBackend::start("b", false).await.address });
    let dir = tempfile::tempdir().unwrap();
    let path = one_backend_config(dir.path(), backend);
    let (_, hard) = rlimit_nofile();
    assert!(hard > 512, "the hard limit here is {hard}");
    let mut child = Running(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -Sn 512 && exec {BIN} --log-format json run --config {}",
                path.display()
            ))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (_, admin, _log) = bound_addresses(&mut child);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let row: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(row[3], row[4], "soft == hard: {limits}");
    assert_eq!(row[4].parse::<u64>().unwrap(), hard);
    let metrics = rt.block_on(support::scrape(admin.parse().unwrap()));
    let cap = metrics.value("sluice_max_connections", &[]);
    let shape = sluice_core::fds::Shape {
        listeners: 1,
        quic_flows: 0,
        heartbeat_listener: false,
        pipes: None,
    };
    let budget = sluice_core::fds::Budget { nofile: hard };
    assert_eq!(
        cap,
        budget.max_connections(shape) as f64,
        "the cap derived from {hard} descriptors"
    );
    signal(child.id(), "TERM");
    assert!(exits_within(&mut child, Duration::from_secs(20)).success());
}

fn rlimit_nofile() -> (u64, u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let row: Vec<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (row[0], row[1])
}

/// `sluice check --no-resolve` checks a config whose names only resolve inside the cluster
/// (CI outside it), and still refuses what no resolver could take.
#[test]
fn check_no_resolve_leaves_names_to_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let text = support::one_pool_config(
        "127.0.0.1:0",
        "",
        "backends = [\"proxy.teleport.svc.cluster.local:3024\", \"proxy.teleport.svc.cluster.local:3025\"]",
    );
    std::fs::write(&path, &text).unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, 1, "the names do not resolve here: {out}");
    let run = |p: &std::path::Path| {
        let out = Command::new(BIN)
            .args(["check", "--no-resolve", "--config"])
            .arg(p)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = run(&path);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(": ok"), "{out}");
    std::fs::write(&path, text.replace(":3025\"", "\"")).unwrap();
    let (code, out) = run(&path);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("has no port"), "{out}");
}

/// `sluice sleep` is the preStop wait of an image without a shell.
#[test]
fn sleep_waits_then_exits_0() {
    let started = std::time::Instant::now();
    let status = Command::new(BIN).args(["sleep", "300ms"]).status().unwrap();
    assert!(status.success());
    assert!(started.elapsed() >= Duration::from_millis(300));
    let out = Command::new(BIN).args(["sleep", "soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("write e.g. 30s"));
}
