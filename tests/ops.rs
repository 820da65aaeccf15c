//! Live operations with the real binary: reload under load (file replacements, an invalid
//! file, SIGHUP, POST /-/reload), the zero-downtime upgrade (fd handover between two
//! processes, and SIGUSR2), systemd socket activation and notifications.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::process::{
    bound_addresses, exits_within, have, signal, sluice_run, sluice_run_command, Running,
    SpawnRunning,
};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

fn conf(backend: &RawBackend, top: &str) -> String {
    one_pool_config(
        "127.0.0.1:0",
        top,
        &format!("backends = [\"{}\"]", backend.address),
    )
}

fn spawn(args: &[&str], path: &Path) -> Running {
    sluice_run(path, args)
}

/// `notify`: a NOTIFY_SOCKET path, as systemd would give.
fn spawn_notifying(args: &[&str], path: &Path, notify: &Path) -> Running {
    sluice_run_command(path, args)
        .env("NOTIFY_SOCKET", notify)
        .spawn_running()
}

async fn open(addr: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&tunnel_hello()).await?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
            Ok(Ok(1)) if b[0] == b'\n' => break,
            Ok(Ok(1)) => line.push(b[0]),
            Ok(Ok(_)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Ok((s, String::from_utf8_lossy(&line).into_owned()))
}

/// Clients opening connections continuously; counts successes and failures and remembers
/// the backend names seen lately.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    last: Arc<Mutex<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(String::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, ok, failed, last) =
                    (stop.clone(), ok.clone(), failed.clone(), last.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match open(addr).await {
                            Ok((_, name)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                *last.lock().unwrap() = name;
                            }
                            Err(e) => failed.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            last,
            tasks,
        }
    }

    async fn until_last(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while *self.last.lock().unwrap() != name {
            assert!(
                Instant::now() < deadline,
                "new connections never reached {name}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until `n` more connections have succeeded: the load is really running.
    async fn until_more(&self, n: u64) {
        let target = self.ok.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "the load made fewer than {n} connections in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Every held tunnel still relays to `backend`.
async fn tunnels_alive(tunnels: Vec<TcpStream>, backend: &str) {
    for mut t in tunnels {
        t.write_all(b"still here").await.expect("tunnel writable");
        t.shutdown().await.unwrap();
        let mut rest = String::new();
        tokio::time::timeout(Duration::from_secs(5), t.read_to_string(&mut rest))
            .await
            .expect("tunnel answers")
            .unwrap();
        let sent = tunnel_hello().len() + 10;
        assert_eq!(
            rest,
            format!("{backend} got {sent} bytes\n"),
            "a tunnel was cut"
        );
    }
}

#[test]
fn reload_under_load_fails_nothing_and_cuts_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let bs = [
            RawBackend::start("A", false).await,
            RawBackend::start("B", false).await,
            RawBackend::start("C", false).await,
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let top = "[reload]\ndebounce = \"30ms\"";
        std::fs::write(&path, conf(&bs[0], top)).unwrap();
        let mut child = spawn(&[], &path);
        let (edge, admin, log) = bound_addresses(&mut child);
        let edge: SocketAddr = edge.parse().unwrap();

        let mut tunnels = Vec::new();
        for _ in 0..40 {
            let (t, name) = open(edge).await.unwrap();
            assert_eq!(name, "A");
            tunnels.push(t);
        }
        let load = Load::start(edge, 4);

        // In-place write.
        std::fs::write(&path, conf(&bs[1], top)).unwrap();
        load.until_last("B").await;
        // Rename-over (editors) and `mv` of a new file.
        std::fs::write(dir.path().join("new.tmp"), conf(&bs[2], top)).unwrap();
        std::fs::rename(dir.path().join("new.tmp"), &path).unwrap();
        load.until_last("C").await;
        // An invalid file in the middle changes nothing.
        std::fs::write(
            &path,
            conf(&bs[0], top).replace("pool = \"p\"", "pool = \"x\""),
        )
        .unwrap();
        log.wait_for("no pool is named `x`", Duration::from_secs(10));
        let metrics = scrape(admin.parse().unwrap()).await;
        assert_eq!(
            metrics.value("sluice_config_last_reload_successful", &[]),
            0.0
        );
        assert_eq!(*load.last.lock().unwrap(), "C");
        // Then many rewrites, every 100 ms for 3 s, alternating the backend.
        for i in 0..30 {
            std::fs::write(&path, conf(&bs[i % 3], top)).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        std::fs::write(&path, conf(&bs[1], top)).unwrap();
        load.until_last("B").await;

        let (ok, failed) = load.finish().await;
        if !failed.is_empty() {
            // Show sluice's side of it: every connection that did not end normally. The
            // tunnels go first, or the drain would wait for them (drain_timeout, 10 minutes).
            drop(tunnels);
            signal(child.id(), "TERM");
            let _ = child.wait();
            let log = log.join().unwrap();
            let odd: Vec<&str> = log
                .lines()
                .filter(|l| {
                    (l.contains("sluice::access") && !l.contains("\"end\":\"closed\""))
                        || l.contains("\"level\":\"WARN\"")
                        || l.contains("\"level\":\"ERROR\"")
                })
                .collect();
            panic!(
                "failed connections: {failed:?}\nsluice said:\n{}",
                odd.join("\n")
            );
        }
        assert!(ok > 100, "only {ok} connections were made");
        tunnels_alive(tunnels, "A").await;

        let metrics = scrape(admin.parse().unwrap()).await;
        assert_eq!(
            metrics.value("sluice_config_last_reload_successful", &[]),
            1.0
        );
        signal(child.id(), "TERM");
        assert!(child.wait().unwrap().success());
        let log = log.join().unwrap();
        assert!(log.contains("no pool is named `x`"), "{log}");
        eprintln!("reload under load: {ok} connections, 0 failed, 40 tunnels kept");
    });
}

#[test]
fn sighup_and_post_reload_when_the_watcher_is_off() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = RawBackend::start("A", false).await;
        let b = RawBackend::start("B", false).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let top = "[reload]\nwatch = false";
        std::fs::write(&path, conf(&a, top)).unwrap();
        let mut child = spawn(&[], &path);
        let (edge, admin, _log) = bound_addresses(&mut child);
        let (edge, admin): (SocketAddr, SocketAddr) =
            (edge.parse().unwrap(), admin.parse().unwrap());

        std::fs::write(&path, conf(&b, top)).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            open(edge).await.unwrap().1,
            "A",
            "no watcher: nothing changes yet"
        );
        signal(child.id(), "HUP");
        eventually("SIGHUP reloads", || async {
            open(edge).await.unwrap().1 == "B"
        })
        .await;

        std::fs::write(&path, conf(&a, top)).unwrap();
        let (status, body) = http_request(admin, "POST", "/-/reload").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"backends_added\": 1"), "{body}");
        assert_eq!(open(edge).await.unwrap().1, "A");

        std::fs::write(&path, "[[route]]\nname = 1\n").unwrap();
        let (status, body) = http_request(admin, "POST", "/-/reload").await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(&format!("{}:2: ", path.display())), "{body}");
        assert_eq!(open(edge).await.unwrap().1, "A");
        let (status, _) = http_get(admin, "/-/reload").await;
        assert_eq!(status, 405, "GET is not a reload");
    });
}

/// A process that is not our child (started by a sluice on SIGUSR2): killed at the end.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn upgrade_hands_the_sockets_over_without_refusing_a_connection() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = RawBackend::start("A", false).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let sock = dir.path().join("upgrade.sock");
        let top = format!(
            "[lifecycle]\nupgrade_socket = \"{}\"\ndrain_delay = \"0s\"\ndrain_timeout = \"30s\"\n[reload]\nwatch = false",
            sock.display()
        );
        std::fs::write(&path, conf(&a, &top)).unwrap();
        // Both processes notify the same socket (under systemd with NotifyAccess=main, only
        // the main one's messages count: the old one names its successor MAINPID=).
        let notify_path = dir.path().join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_nonblocking(true).unwrap();
        let mut old = spawn_notifying(&[], &path, &notify_path);
        let (edge, admin, old_log) = bound_addresses(&mut old);
        let edge: SocketAddr = edge.parse().unwrap();

        let mut tunnels = Vec::new();
        for _ in 0..10 {
            tunnels.push(open(edge).await.unwrap().0);
        }
        let load = Load::start(edge, 4);
        load.until_more(20).await;

        // The new process takes the sockets over.
        let mut new = spawn_notifying(&["--upgrade"], &path, &notify_path);
        let (edge2, admin2, new_log) = bound_addresses(&mut new);
        assert_eq!(edge2, edge.to_string(), "same listening socket");
        assert_eq!(admin2, admin, "same admin socket");
        // The old one keeps its tunnels; it exits once they end.
        old_log.wait_for("a new sluice took over the sockets", Duration::from_secs(10));
        load.until_more(20).await;
        assert!(old.try_wait().unwrap().is_none(), "old process waits for its connections");
        let (status, body) = http_get(admin.parse().unwrap(), "/readyz").await;
        assert_eq!((status, body.as_str()), (200, "ready\n"), "the new process answers");
        tunnels_alive(tunnels, "A").await;
        let status = exits_within(&mut old, Duration::from_secs(10));
        assert!(status.success(), "old process exit: {status:?}");
        let (ok, failed) = load.finish().await;
        assert!(failed.is_empty(), "refused or failed across the handover: {failed:?}");
        // systemd learns the new main pid, and never hears STOPPING=1 (it would stop the
        // whole unit, the new process included).
        let mut said = String::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = notify.recv(&mut buf) {
            said.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(said.contains(&format!("MAINPID={}", new.id())), "{said}");
        old_log.wait_for(
            &format!("\"new_pid\":{}", new.id()),
            Duration::from_secs(5),
        );
        assert!(!said.contains("STOPPING=1"), "{said}");

        // Again, by signal: SIGUSR2 makes the running process start its successor.
        let load = Load::start(edge, 4);
        load.until_more(20).await;
        signal(new.id(), "USR2");
        let status = exits_within(&mut new, Duration::from_secs(20));
        assert!(status.success(), "second process exit: {status:?}");
        let (ok2, failed) = load.finish().await;
        assert!(failed.is_empty(), "refused or failed across the SIGUSR2 upgrade: {failed:?}");
        let (status, _) = http_get(admin.parse().unwrap(), "/readyz").await;
        assert_eq!(status, 200, "the third process serves");
        // The third process is the second one's child: find it through the admin API.
        let (_, body) = http_get(admin.parse().unwrap(), "/debug/process").await;
        let third = serde_json::from_str::<serde_json::Value>(&body).unwrap()["pid"]
            .as_u64()
            .unwrap() as u32;
        assert_ne!(third, new.id());
        let third = KillOnDrop(third);
        signal(third.0, "TERM");
        // Its stderr is the second process's pipe: the log ends when it exits.
        let new_log = new_log.join().unwrap();
        assert!(new_log.contains("upgrade complete"), "{new_log}");
        assert!(new_log.contains("SIGUSR2: started the new sluice"), "{new_log}");
        let old_log = old_log.join().unwrap();
        assert!(
            old_log.contains("a new sluice took over the sockets"),
            "{old_log}"
        );
        eprintln!("upgrade: {ok} + {ok2} connections across two handovers, none failed");
    });
}

/// `systemd-socket-activate` passes the listening socket as fd 3 with LISTEN_FDNAMES=edge,
/// and sluice reports READY=1 / RELOADING=1 / STOPPING=1 on NOTIFY_SOCKET.
#[test]
fn socket_activation_and_systemd_notifications() {
    if !have("systemd-socket-activate") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = RawBackend::start("A", false).await;
        let port = {
            // Its own loopback address: sluice's listeners (and HAProxy's) set SO_REUSEPORT, so
            // a port number reused on 127.0.0.1 by a test running in parallel would share
            // connections with it.
            let l = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let text = conf(
            &a,
            "[lifecycle]\ndrain_delay = \"0s\"\n[reload]\nwatch = false",
        )
        .replace(
            "address = \"127.0.0.1:0\"\n\n[[route]]",
            &format!("address = \"127.0.0.3:{port}\"\n\n[[route]]"),
        );
        std::fs::write(&path, text).unwrap();
        let notify_path = dir.path().join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();

        let mut child = Running(
            Command::new("systemd-socket-activate")
                .args(["-l", &format!("127.0.0.3:{port}"), "--fdname=edge"])
                .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
                .arg(BIN)
                .args(["--log-format", "json", "run", "--config"])
                .arg(&path)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let edge: SocketAddr = format!("127.0.0.3:{port}").parse().unwrap();
        // systemd-socket-activate binds, then execs sluice with the socket as fd 3.
        let started = Instant::now();
        let name = loop {
            match open(edge).await {
                Ok((_, name)) => break name,
                Err(e) if started.elapsed() < Duration::from_secs(10) => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("the socket-activated edge never answered: {e}"),
            }
        };
        assert_eq!(name, "A");
        let mut buf = [0u8; 512];
        let mut next = || {
            let n = notify
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("a notification: {e}"));
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let ready = next();
        assert!(ready.contains("READY=1"), "{ready}");
        let pid = child.id();
        signal(pid, "HUP");
        let reloading = next();
        assert!(reloading.contains("RELOADING=1"), "{reloading}");
        let ready = next();
        assert!(ready.contains("READY=1"), "{ready}");
        signal(pid, "TERM");
        let stopping = next();
        assert!(stopping.contains("STOPPING=1"), "{stopping}");
        let status = exits_within(&mut child, Duration::from_secs(15));
        assert!(status.success(), "{status:?}");
        let mut log = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
        assert!(log.contains("using an inherited listening socket"), "{log}");

        // A socket no listener claims is an error, not a port that queues clients forever.
        let mut wrong = Running(
            Command::new("systemd-socket-activate")
                .args(["-l", &format!("127.0.0.3:{port}"), "--fdname=other", BIN])
                .args(["run", "--config"])
                .arg(&path)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let started = Instant::now();
        while TcpStream::connect(edge).await.is_err() {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let status = exits_within(&mut wrong, Duration::from_secs(10));
        assert_eq!(status.code(), Some(1));
        let mut err = String::new();
        std::io::Read::read_to_string(wrong.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            err.contains("the socket named `other` matches no [[listener]]"),
            "{err}"
        );
    });
}

/// `ListenDatagram=` (systemd/sluice-quic.socket): a QUIC listener serves on the UDP socket
/// systemd bound, named by `FileDescriptorName=`.
#[test]
fn a_quic_listener_takes_a_socket_activated_udp_socket() {
    if !have("systemd-socket-activate") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = RawBackend::start("A", false).await;
        let port = free_udp_address("127.0.0.4").port();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        let text = conf(&a, "[reload]\nwatch = false").replace(
            "[[route]]",
            &format!(
                "[[listener]]\nname = \"edge-quic\"\naddress = \"127.0.0.4:{port}\"\nprotocol = \"quic\"\n\n[[route]]"
            ),
        );
        std::fs::write(&path, text).unwrap();
        let mut child = Running(
            Command::new("systemd-socket-activate")
                .args(["--datagram", "-l", &format!("127.0.0.4:{port}")])
                .arg("--fdname=edge-quic")
                .arg(BIN)
                .args(["--log-format", "json", "run", "--config"])
                .arg(&path)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // systemd-socket-activate starts sluice at the first datagram (as systemd does).
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut junk = vec![0xc0u8, 0, 0, 0, 1];
        junk.resize(1200, 0);
        std::thread::sleep(Duration::from_millis(200));
        client.send_to(&junk, ("127.0.0.4", port)).unwrap();
        let (_, admin, log) = bound_addresses(&mut child);
        log.wait_for("using an inherited UDP socket", Duration::from_secs(10));
        let admin: SocketAddr = admin.parse().unwrap();
        let (_, listeners) = http_get(admin, "/debug/listeners").await;
        assert!(
            listeners.contains(&format!("127.0.0.4:{port}")),
            "{listeners}"
        );
        // Datagrams sent to that socket reach sluice's QUIC listener (this one is no valid
        // Initial: it is counted as refused, which proves it was read).
        client.send_to(&junk, ("127.0.0.4", port)).unwrap();
        eventually("the datagram was read", || async {
            scrape(admin)
                .await
                .sum("sluice_quic_initials_total", &[("listener", "edge-quic")])
                > 0.0
        })
        .await;
        signal(child.id(), "TERM");
        assert!(exits_within(&mut child, Duration::from_secs(20)).success());
    });
}
