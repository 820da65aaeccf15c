//! A real etcd cluster (Debian's `etcd-server`) on loopback ports with temporary data dirs,
//! started and killed with the test: members can be killed, paused (SIGSTOP: a hung etcd)
//! and brought back.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{have, signal, Running};

pub struct EtcdCluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    initial: String,
    token: String,
    /// TLS on the client port: a directory with `ca.pem`, `server.pem`, `server-key.pem`
    /// (etcd's) and `client.pem`, `client-key.pem` (etcdctl's); client certificates required.
    tls: Option<std::path::PathBuf>,
    /// `--user` for etcdctl once authentication is on.
    pub user: Option<String>,
}

pub struct Member {
    pub name: String,
    pub client: String,
    peer: String,
    child: Option<Running>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdCluster {
    /// `None` (the test is skipped) when etcd is not installed, outside CI.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, None)
    }

    /// One member serving clients over TLS with client certificates (see `tls`).
    pub fn start_tls(certs: &std::path::Path) -> Option<EtcdCluster> {
        Self::start_with(1, Some(certs.to_path_buf()))
    }

    fn start_with(n: usize, tls: Option<std::path::PathBuf>) -> Option<EtcdCluster> {
        if !have("etcd") {
            return None;
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            dir,
            initial,
            token: format!("sluice-test-{}-{}", std::process::id(), free_port()),
            tls,
            user: None,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let mut cmd = Command::new("etcd");
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(t.join("server.pem"))
                .arg("--key-file")
                .arg(t.join("server-key.pem"))
                .arg("--trusted-ca-file")
                .arg(t.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &self.initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Elections in well under a second on loopback.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(Running(child));
    }

    /// The client URLs, as `store.endpoints` lists them.
    pub fn endpoints(&self) -> String {
        super::quoted(self.members.iter().map(|m| &m.client))
    }

    /// Wait until every running member answers `/health` with a leader.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            while !self.healthy(m) {
                assert!(
                    Instant::now() < deadline,
                    "etcd {} never became healthy",
                    m.name
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn kill(&mut self, i: usize) {
        self.members[i].child = None;
    }

    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        if m.child.is_none() {
            // The member comes back with its data dir: "existing", as after a crash.
            self.spawn(i);
        }
    }

    /// SIGSTOP / SIGCONT: etcd hangs without closing its connections.
    pub fn pause(&self, i: usize, paused: bool) {
        if let Some(c) = &self.members[i].child {
            signal(c.id(), if paused { "STOP" } else { "CONT" });
        }
    }

    /// `etcdctl <args>` against the running members; its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let endpoints: Vec<&str> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client.as_str())
            .collect();
        let out = self
            .etcdctl(&endpoints.join(","))
            .args(args)
            .output()
            .expect("etcdctl runs");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn etcdctl(&self, endpoints: &str) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"));
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.join("ca.pem").display()))
                .arg(format!("--cert={}", t.join("client.pem").display()))
                .arg(format!("--key={}", t.join("client-key.pem").display()));
        }
        if let Some(u) = &self.user {
            cmd.arg(format!("--user={u}"));
        }
        cmd
    }

    fn healthy(&self, m: &Member) -> bool {
        if self.tls.is_none() {
            return m.healthy();
        }
        self.etcdctl(&m.client)
            .args(["endpoint", "health"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The member that leads now (its index), asked of a running member.
    pub fn leader(&self) -> usize {
        let status = self.ctl(&["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&status).unwrap();
        let leader = v[0]["Status"]["leader"].as_u64().unwrap();
        let members = self.ctl(&["member", "list", "-w", "json"]);
        let m: serde_json::Value = serde_json::from_str(&members).unwrap();
        let name = m["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["ID"].as_u64() == Some(leader))
            .and_then(|x| x["name"].as_str())
            .unwrap()
            .to_owned();
        self.members.iter().position(|x| x.name == name).unwrap()
    }
}

impl Member {
    fn healthy(&self) -> bool {
        let Some(addr) = self.client.strip_prefix("http://") else {
            return false;
        };
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return false;
        };
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}
