//! Live operations in-process: reloads from files, the file watcher, per-backend min_ready and
//! removal, and the drain's close_spread. Real sockets on 127.0.0.1.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice::control::reload::{self, Outcome};
use sluice::control::server::Server;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// A config with one listener, one catch-all route to pool `p`, and `pool_extra` keys.
fn conf(backends: &[&RawBackend], pool_extra: &str, top: &str) -> String {
    let list = quoted(backends.iter().map(|b| b.address));
    one_pool_config(
        "127.0.0.1:0",
        top,
        &format!("backends = [{list}]\n{pool_extra}"),
    )
}

struct Setup {
    _dir: tempfile::TempDir,
    path: PathBuf,
    server: Server,
}

impl Setup {
    async fn new(text: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = sluice::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let server = Server::start(cfg).await.expect("sluice starts");
        Setup {
            _dir: dir,
            path,
            server,
        }
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    async fn reload(&self) -> Outcome {
        reload::reload(&self.server.rt, "test").await
    }

    fn dir(&self) -> &Path {
        self.path.parent().unwrap()
    }
}

/// The connection still relays: half-close it and read the backend's byte count.
async fn still_relays(mut s: TcpStream, backend: &str) {
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut rest))
        .await
        .expect("answer in time")
        .unwrap();
    assert!(
        rest.starts_with(&format!("{backend} got ")),
        "established connection answered {rest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_new_connections_and_keeps_established_ones() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let s = Setup::new(&conf(&[&a], "", "")).await;
    let addr = edge(&s.server);
    let hash_before = s.server.rt.snapshot().config.hash.clone();

    let (old, name) = open_tunnel(addr).await;
    assert_eq!(name, "A");

    s.write(&conf(&[&b], "", ""));
    match s.reload().await {
        Outcome::Applied(sum) => {
            assert_eq!((sum.backends_added, sum.backends_removed), (1, 1));
            assert!(sum.listeners_added.is_empty() && sum.listeners_removed.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        open_tunnel(addr).await.1,
        "B",
        "new connections take the new backend"
    );
    still_relays(old, "A").await;

    let hash_after = s.server.rt.snapshot().config.hash.clone();
    assert_ne!(hash_before, hash_after);
    assert_eq!(
        metric(
            &s.server,
            "sluice_config_reloads_total",
            &[("result", "success")]
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&s.server, "sluice_config_info", &[("hash", &hash_after)]).await,
        1.0
    );
    assert_eq!(
        metric(&s.server, "sluice_config_info", &[("hash", &hash_before)]).await,
        0.0,
        "the old hash is no longer exported"
    );
    // The same files again: nothing to do.
    assert!(matches!(s.reload().await, Outcome::Unchanged));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_changes_nothing() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let s = Setup::new(&conf(&[&a], "", "")).await;
    let addr = edge(&s.server);
    let (old, _) = open_tunnel(addr).await;

    // A route naming a pool that does not exist, and a bad duration.
    let bad = conf(&[&b], "", "").replace("pool = \"p\"\nidle", "pool = \"nope\"\nidle");
    s.write(&(bad + "\n[lifecycle]\ndrain_delay = \"soon\"\n"));
    let Outcome::Rejected(errors) = s.reload().await else {
        panic!("an invalid config must be rejected")
    };
    let path = s.path.display().to_string();
    assert!(
        errors.contains(&format!(
            "{path}:12: route[0].pool: no pool is named `nope`"
        )),
        "{errors}"
    );
    assert!(errors.contains("lifecycle.drain_delay"), "{errors}");
    assert_eq!(
        metric(&s.server, "sluice_config_last_reload_successful", &[]).await,
        0.0
    );
    assert_eq!(open_tunnel(addr).await.1, "A", "the running config stays");

    // A TOML syntax error is rejected the same way.
    s.write("[[listener]\nname = ");
    assert!(matches!(s.reload().await, Outcome::Rejected(_)));

    s.write(&conf(&[&b], "", ""));
    assert!(matches!(s.reload().await, Outcome::Applied(_)));
    assert_eq!(
        metric(&s.server, "sluice_config_last_reload_successful", &[]).await,
        1.0
    );
    assert_eq!(
        metric(
            &s.server,
            "sluice_config_reloads_total",
            &[("result", "failure")]
        )
        .await,
        2.0
    );
    assert_eq!(open_tunnel(addr).await.1, "B");
    still_relays(old, "A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_come_and_go_without_touching_connections() {
    let a = RawBackend::start("A", false).await;
    let s = Setup::new(&conf(&[&a], "", "")).await;
    let first = edge(&s.server);
    let (old, _) = open_tunnel(first).await;

    // Add a second listener.
    let two =
        conf(&[&a], "", "") + "\n[[listener]]\nname = \"second\"\naddress = \"127.0.0.1:0\"\n";
    s.write(&two);
    let Outcome::Applied(sum) = s.reload().await else {
        panic!()
    };
    assert_eq!(sum.listeners_added, vec!["second".to_owned()]);
    let second = s.server.listener_addr("second").expect("second listener");
    assert_eq!(open_tunnel(second).await.1, "A");
    assert_eq!(
        s.server.listener_addr("edge"),
        Some(first),
        "an unchanged listener keeps its socket"
    );

    // A changed option (hello_timeout) keeps the socket too.
    s.write(&two.replacen(
        "name = \"edge\"\naddress = \"127.0.0.1:0\"\n",
        "name = \"edge\"\naddress = \"127.0.0.1:0\"\nhello_timeout = \"3s\"\n",
        1,
    ));
    let Outcome::Applied(sum) = s.reload().await else {
        panic!()
    };
    assert_eq!(sum.listeners_updated, vec!["edge".to_owned()]);
    assert_eq!(s.server.listener_addr("edge"), Some(first));
    assert_eq!(open_tunnel(first).await.1, "A");

    // Remove the first listener: it stops accepting; its connection lives on.
    s.write(
        &two.replacen("name = \"edge\"", "name = \"gone\"", 1)
            .replacen(
                "[[listener]]\nname = \"gone\"\naddress = \"127.0.0.1:0\"\n",
                "",
                1,
            ),
    );
    let Outcome::Applied(sum) = s.reload().await else {
        panic!()
    };
    assert_eq!(sum.listeners_removed, vec!["edge".to_owned()]);
    eventually("the removed listener refuses connections", || async {
        TcpStream::connect(first).await.is_err()
    })
    .await;
    assert_eq!(open_tunnel(second).await.1, "A");
    still_relays(old, "A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_backend_keeps_its_state() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let s = Setup::new(&conf(&[&a], "balance = \"least_conn\"", "")).await;
    let addr = edge(&s.server);
    let (held, _) = open_tunnel(addr).await;
    let before = s.server.rt.snapshot().pools["p"].backends()[0].clone();
    assert_eq!(before.active(), 1);

    // Add B: A is the same object, still counting the held connection, so least_conn sends
    // the next two connections to B and B.
    s.write(&conf(&[&a, &b], "balance = \"least_conn\"", ""));
    assert!(matches!(s.reload().await, Outcome::Applied(_)));
    let snap = s.server.rt.snapshot();
    let list = snap.pools["p"].backends();
    let after = list.iter().find(|x| x.address == a.address).unwrap();
    assert!(std::sync::Arc::ptr_eq(&before, after));
    assert_eq!(after.active(), 1);
    let (c1, n1) = open_tunnel(addr).await;
    assert_eq!(n1, "B", "least_conn knows A already holds one");
    drop(c1);
    still_relays(held, "A").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_is_closed_after_removed_drain_timeout() {
    removed_backend_closes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_closes_its_parked_connections_too() {
    removed_backend_closes(true).await;
}

/// `parked`: the held tunnel is in the parking lot (no task) when its backend is removed.
async fn removed_backend_closes(parked: bool) {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let extra = "removed_drain_timeout = \"400ms\"";
    let park = if parked { "100ms" } else { "0s" };
    let top = format!("[lifecycle]\nclose_spread = \"0s\"\n[limits]\npark_idle_after = \"{park}\"");
    let top = top.as_str();
    let s = Setup::new(&conf(&[&a], extra, top)).await;
    let addr = edge(&s.server);
    let (mut held, _) = open_tunnel(addr).await;
    if parked {
        eventually("parked", || async {
            metric(&s.server, "sluice_relay_parked", &[]).await == 1.0
        })
        .await;
    }

    s.write(&conf(&[&b], extra, top));
    // The backend is removed during the reload, after this instant: the connection must not
    // close before removed_drain_timeout (400 ms) has passed from here, and must close then
    // (a loaded machine only makes it later).
    let removed_at = Instant::now();
    assert!(matches!(s.reload().await, Outcome::Applied(_)));
    held.write_all(b"x").await.unwrap();
    let end = read_to_end(&mut held, Duration::from_secs(5)).await;
    assert!(end.is_some(), "closed after removed_drain_timeout");
    let took = removed_at.elapsed();
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    eventually("counted as backend_removed", || async {
        metric(
            &s.server,
            "sluice_connections_closed_total",
            &[("reason", "backend_removed")],
        )
        .await
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_by_reload_waits_for_min_ready() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let min_ready = Duration::from_millis(1500);
    let extra = "min_ready = \"1500ms\"\nbalance = \"round_robin\"";
    let s = Setup::new(&conf(&[&a], extra, "")).await;
    let addr = edge(&s.server);

    s.write(&conf(&[&a, &b], extra, ""));
    // B is added during the reload, so it cannot be ready before `added + min_ready`: every
    // connection made before then must reach A, however slow the machine is.
    let added = Instant::now();
    assert!(matches!(s.reload().await, Outcome::Applied(_)));
    // Backends keep their ready time in whole milliseconds: B may turn ready up to 1 ms before
    // min_ready has passed on this clock, so the early checks leave it 2.
    let early = min_ready - Duration::from_millis(2);
    let snapshot = s.server.rt.snapshot();
    let view = snapshot.pools["p"].view();
    if added.elapsed() < early {
        let b_view = view.backends.iter().find(|v| v.address == b.address);
        assert_eq!(b_view.unwrap().state, "warming");
    }
    let mut names = Vec::new();
    while added.elapsed() < Duration::from_millis(1000) {
        let name = open_tunnel(addr).await.1;
        if added.elapsed() >= early {
            break;
        }
        names.push(name);
    }
    assert!(
        names.iter().all(|n| n == "A"),
        "a warming backend took connections: {names:?}"
    );
    // Once min_ready has passed, B takes its share.
    eventually("B takes connections after min_ready", || async {
        open_tunnel(addr).await.1 == "B"
    })
    .await;
    assert!(added.elapsed() >= early);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_the_leftovers_spread_over_close_spread() {
    let a = RawBackend::start("A", false).await;
    let top =
        "[lifecycle]\ndrain_delay = \"0s\"\ndrain_timeout = \"200ms\"\nclose_spread = \"1500ms\"";
    let s = Setup::new(&conf(&[&a], "", top)).await;
    let addr = edge(&s.server);
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(open_tunnel(addr).await.0);
    }
    let started = Instant::now();
    let server = std::sync::Arc::new(s.server);
    let srv = server.clone();
    let drain = tokio::spawn(async move { srv.drain(std::future::pending(), true).await });
    let mut closed_at = Vec::new();
    let waits: Vec<_> = held
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let _ = read_to_end(&mut c, Duration::from_secs(5)).await;
                Instant::now()
            })
        })
        .collect();
    for w in waits {
        closed_at.push(w.await.unwrap().duration_since(started));
    }
    drain.await.unwrap();
    closed_at.sort();
    let (first, last) = (closed_at[0], closed_at[closed_at.len() - 1]);
    assert!(
        first >= Duration::from_millis(190),
        "nothing closes before drain_timeout: {closed_at:?}"
    );
    assert!(
        last - first >= Duration::from_millis(400),
        "closes are spread, not all at once: {closed_at:?}"
    );
    assert!(
        last <= Duration::from_millis(4000),
        "all closed within drain_timeout + close_spread: {closed_at:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conf_d_files_are_merged_and_their_errors_point_at_them() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    // The main file routes only SNI b.example.com to pool `p`; conf.d adds the rest.
    let main = conf(&[&a], "", "").replace(
        "name = \"all\"\n",
        "name = \"b-only\"\nsni = [\"b.example.com\"]\n",
    );
    let s = Setup::new(&main).await;
    let addr = edge(&s.server);
    let conf_d = s.dir().join("conf.d");
    std::fs::create_dir(&conf_d).unwrap();
    let extra = format!(
        "[[route]]\nname = \"rest\"\npool = \"q\"\n\n[pool.q]\nbackends = [\"{}\"]\n",
        b.address
    );
    std::fs::write(conf_d.join("10-rest.toml"), &extra).unwrap();
    // Not a .toml file: ignored.
    std::fs::write(conf_d.join("notes.txt"), "[[route]]").unwrap();
    assert!(matches!(s.reload().await, Outcome::Applied(_)));
    assert_eq!(
        open_tunnel(addr).await.1,
        "B",
        "the conf.d route serves the rest"
    );
    assert_eq!(
        s.server.rt.snapshot().config.files.len(),
        2,
        "main + one conf.d file"
    );

    // An error in conf.d names that file and its line; [lifecycle] belongs to the main file.
    std::fs::write(
        conf_d.join("20-bad.toml"),
        "\n[[route]]\nname = \"bad\"\npool = \"missing\"\n",
    )
    .unwrap();
    std::fs::write(
        conf_d.join("30-global.toml"),
        "[lifecycle]\nmin_ready = \"1s\"\n",
    )
    .unwrap();
    let Outcome::Rejected(errors) = s.reload().await else {
        panic!()
    };
    let bad = conf_d.join("20-bad.toml").display().to_string();
    assert!(
        errors.contains(&format!(
            "{bad}:4: route[0].pool: no pool is named `missing`"
        )),
        "{errors}"
    );
    assert!(
        errors.contains(
            "30-global.toml:1: lifecycle: [lifecycle] may only be set in the main config file"
        ),
        "{errors}"
    );
    assert_eq!(open_tunnel(addr).await.1, "B", "the running config stays");
}

/// The ways people and tools replace a config file, seen by the watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_sees_every_way_of_replacing_a_file() {
    let backends = [
        RawBackend::start("A", false).await,
        RawBackend::start("B", false).await,
        RawBackend::start("C", false).await,
        RawBackend::start("D", false).await,
    ];
    let dir = tempfile::tempdir().unwrap();
    // Kubernetes layout: sluice.toml -> ..data/sluice.toml, ..data -> ..v1
    let k8s = dir.path();
    std::fs::create_dir(k8s.join("..v1")).unwrap();
    std::fs::write(
        k8s.join("..v1/sluice.toml"),
        conf(&[&backends[0]], "", "[reload]\ndebounce = \"50ms\""),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", k8s.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/sluice.toml", k8s.join("sluice.toml")).unwrap();
    let path = k8s.join("sluice.toml");
    let server = Server::start(sluice::config::load(&path).unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let watch = reload::ConfigWatch::start(server.rt.clone()).expect("the config is watched");
    tokio::spawn(watch.run(stop.clone()));
    let addr = edge(&server);
    let text = |i: usize| conf(&[&backends[i]], "", "[reload]\ndebounce = \"50ms\"");
    let expect = |name: &'static str| {
        let server = &server;
        async move {
            eventually(&format!("new connections reach {name}"), || async {
                open_tunnel(addr).await.1 == name
            })
            .await;
            let _ = server;
        }
    };

    // 1. Kubernetes ConfigMap update: a new ..v2 directory, ..data swapped atomically.
    std::fs::create_dir(k8s.join("..v2")).unwrap();
    std::fs::write(k8s.join("..v2/sluice.toml"), text(1)).unwrap();
    std::os::unix::fs::symlink("..v2", k8s.join("..data_tmp")).unwrap();
    std::fs::rename(k8s.join("..data_tmp"), k8s.join("..data")).unwrap();
    std::fs::remove_dir_all(k8s.join("..v1")).unwrap();
    expect("B").await;

    // From here on a plain file (the symlink replaced by `mv`): 2. mv of a new file.
    let staged = k8s.join("staged.new");
    std::fs::write(&staged, text(2)).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    expect("C").await;

    // 3. In-place write (truncate + write, as `cat > file` or `sed -i`-less editors).
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, text(3).as_bytes()).unwrap();
    }
    expect("D").await;

    // 4. Editor-style: write a swap file, rename it over the original.
    std::fs::write(k8s.join(".sluice.toml.swp"), text(0)).unwrap();
    std::fs::rename(k8s.join(".sluice.toml.swp"), &path).unwrap();
    expect("A").await;

    stop.cancel();
    server.shutdown().await;
}

/// A file rewritten more often than `debounce` (a busy config generator) is still reloaded,
/// at most 10 × debounce (at least 1 s) after the first change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_nonstop_is_still_reloaded() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let top = "[reload]\ndebounce = \"100ms\"";
    let setup = Setup::new(&conf(&[&a], "", top)).await;
    let stop = CancellationToken::new();
    let watch = reload::ConfigWatch::start(setup.server.rt.clone()).expect("the config is watched");
    tokio::spawn(watch.run(stop.clone()));
    let addr = edge(&setup.server);
    // Every 40 ms, well inside the 100 ms debounce: a purely trailing debounce never fires.
    let writer = {
        let path = setup.path.clone();
        let text = conf(&[&b], "", top);
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                std::fs::write(&path, &text).unwrap();
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    eventually(
        "new connections reach B while the file is still being rewritten",
        || async { open_tunnel(addr).await.1 == "B" },
    )
    .await;
    assert!(!writer.is_finished(), "the writer was still rewriting");
    stop.cancel();
    writer.await.unwrap();
    setup.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_until_min_ready_has_passed() {
    let a = RawBackend::start("A", false).await;
    let min_ready = Duration::from_secs(2);
    let started = Instant::now();
    let s = Setup::new(&conf(&[&a], "", "[lifecycle]\nmin_ready = \"2s\"")).await;
    // Serving (connections are routed) but not ready yet. A loaded machine may take longer
    // than min_ready to get here; what must hold is that a state read before min_ready had
    // passed is Starting.
    assert_eq!(open_tunnel(edge(&s.server)).await.1, "A");
    let state = s.server.rt.state();
    if started.elapsed() < min_ready {
        assert_eq!(state, sluice::control::runtime::State::Starting);
    }
    s.server.ready().await;
    assert!(started.elapsed() >= min_ready);
    assert_eq!(s.server.rt.state(), sluice::control::runtime::State::Ready);
}

/// Sockets handed over (systemd, an upgrade) are matched to listeners by name; one that no
/// listener claims is closed, not left queueing clients nobody accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inherited_sockets_are_matched_by_name_and_strays_closed() {
    let a = RawBackend::start("A", false).await;
    let edge_sock = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (edge_addr, stray_addr) = (edge_sock.local_addr().unwrap(), stray.local_addr().unwrap());
    let text = conf(&[&a], "", "");
    let cfg = sluice::config::parse(Path::new("t.toml"), &text).unwrap();
    let inherited = [
        ("edge".to_owned(), edge_sock),
        ("old-listener".to_owned(), stray),
    ]
    .into_iter()
    .collect();
    let server = Server::start_with(cfg, inherited).await.unwrap();
    assert_eq!(
        edge(&server),
        edge_addr,
        "the `edge` listener uses the inherited socket"
    );
    assert_eq!(open_tunnel(edge_addr).await.1, "A");
    assert!(
        TcpStream::connect(stray_addr).await.is_err(),
        "the unclaimed socket is closed"
    );
    server.shutdown().await;
}

/// The config file is a symlink into another directory; an in-place edit of the target is
/// seen too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_follows_a_symlinked_config_to_its_directory() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let etc = tempfile::tempdir().unwrap();
    let opt = tempfile::tempdir().unwrap();
    let target = opt.path().join("real.toml");
    let top = "[reload]\ndebounce = \"50ms\"";
    std::fs::write(&target, conf(&[&a], "", top)).unwrap();
    let link = etc.path().join("sluice.toml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let server = Server::start(sluice::config::load(&link).unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let watch = reload::ConfigWatch::start(server.rt.clone()).expect("the config is watched");
    tokio::spawn(watch.run(stop.clone()));
    let addr = edge(&server);
    assert_eq!(open_tunnel(addr).await.1, "A");
    std::fs::write(&target, conf(&[&b], "", top)).unwrap();
    eventually("the edit of the symlink target is seen", || async {
        open_tunnel(addr).await.1 == "B"
    })
    .await;
    stop.cancel();
    server.shutdown().await;
}

/// A reload arriving during a drain changes nothing and binds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reload_while_draining() {
    let a = RawBackend::start("A", false).await;
    let b = RawBackend::start("B", false).await;
    let top = "[lifecycle]\ndrain_delay = \"0s\"\ndrain_timeout = \"2s\"";
    let s = Setup::new(&conf(&[&a], "", top)).await;
    let addr = edge(&s.server);
    let (held, _) = open_tunnel(addr).await;
    let server = std::sync::Arc::new(s.server);
    let srv = server.clone();
    let drain = tokio::spawn(async move { srv.drain(std::future::pending(), true).await });
    eventually("listener closed", || async {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
    std::fs::write(
        &s.path,
        conf(&[&b], "", top) + "\n[[listener]]\nname = \"late\"\naddress = \"127.0.0.1:0\"\n",
    )
    .unwrap();
    assert!(matches!(
        reload::reload(&server.rt, "test").await,
        Outcome::Rejected(_)
    ));
    assert!(
        server.listener_addr("late").is_none(),
        "no listener bound during a drain"
    );
    still_relays(held, "A").await;
    drain.await.unwrap();
}
