//! QUIC passthrough on UDP: route a QUIC connection by the SNI and ALPN of its ClientHello,
//! read from the client's Initial packets, and forward its datagrams unchanged.
//!
//! Owns: the UDP socket of a `protocol = "quic"` listener, the flow table (client address →
//! backend; server connection IDs → flow, for migration and NAT rebinding), pending flows
//! (Initials waiting for the rest of the hello, bounded), one connected UDP socket per flow
//! toward its backend (so replies find their way back), flow expiry, and the QUIC metrics.
//! It never decrypts anything but the client's Initials, and never changes a byte: TLS stays
//! end to end. The packet logic is in `packet` (pure).

pub mod terminate;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::edge::connection::Edge;
use crate::snapshot::{Route, Target};
use crate::upstream::{clock_ms, ActiveGuard};
use sluice_core::hello::Parse;
use sluice_core::quic::packet::{self, CryptoStream, Header, LongType};
use sluice_core::route::{Facts, TlsFacts};

/// Datagrams and bytes a pending flow may hold while its hello is incomplete.
const PENDING_DATAGRAMS: usize = 16;
const PENDING_BYTES: usize = 64 * 1024;
/// Connection IDs remembered per flow (the server may issue several).
const CIDS_PER_FLOW: usize = 16;
const MAX_DATAGRAM: usize = 65535;

/// One client's QUIC connection, routed.
struct Flow {
    id: u64,
    route: Arc<Route>,
    /// Counts the flow on its backend (least_conn, p2c, the active gauge); none when sluice
    /// terminates the flow (its streams count on the backends they reach).
    _guard: Option<ActiveGuard>,
    /// A terminated flow: its endpoint and this flow's socket port there (for PROXY headers).
    terminator: Option<(Arc<terminate::Terminator>, u16)>,
    upstream: Arc<UdpSocket>,
    client: Mutex<SocketAddr>,
    last_seen: AtomicU64,
    cids: Mutex<Vec<Vec<u8>>>,
    stop: CancellationToken,
}

impl Flow {
    fn client(&self) -> SocketAddr {
        *self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client moved (migration, rebinding).
    fn set_client(&self, peer: SocketAddr) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = peer;
        if let Some((t, port)) = &self.terminator {
            t.register(*port, peer);
        }
    }
}

/// A client whose hello is not complete yet.
struct Pending {
    version: u32,
    dcid: Vec<u8>,
    keys: rustls::quic::Keys,
    crypto: CryptoStream,
    datagrams: Vec<Vec<u8>>,
    bytes: usize,
    started: u64,
}

#[derive(Default)]
struct Flows {
    /// Every flow, by id.
    all: HashMap<u64, Arc<Flow>>,
    next_id: u64,
    /// The newest flow of each client address.
    by_client: HashMap<SocketAddr, Arc<Flow>>,
    by_cid: HashMap<Vec<u8>, Arc<Flow>>,
    /// Lengths of the server connection IDs seen (a short header does not say its length).
    cid_lens: BTreeSet<usize>,
    /// By client address and the DCID of its first Initial: one address may open several
    /// connections (one UDP socket, many connections, as quinn's endpoints do).
    pending: HashMap<(SocketAddr, Vec<u8>), Pending>,
}

/// A running QUIC listener.
pub struct QuicListener {
    pub config: ArcSwap<ListenerConfig>,
    pub socket: Arc<UdpSocket>,
    pub local_addr: SocketAddr,
    /// Stops everything (the process ends, or the listener is gone and idle).
    stop: CancellationToken,
    /// False once a drain or a reload closed it: established flows go on, new ones are refused.
    accepting: AtomicBool,
    flows: Mutex<Flows>,
    m: QuicMetrics,
}

struct QuicMetrics {
    active: IntGauge,
    packets_in: IntCounter,
    packets_out: IntCounter,
    bytes_in: IntCounter,
    bytes_out: IntCounter,
    migrations: IntCounter,
    /// `sluice_quic_initials_total{result="timeout"}`: hellos not complete within hello_timeout.
    timeouts: IntCounter,
}

impl QuicListener {
    /// Bind the UDP socket of `cfg` (before anything changes, so a failure changes nothing).
    pub fn bind(cfg: &ListenerConfig) -> std::io::Result<UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(
            Domain::for_address(cfg.address),
            Type::DGRAM,
            Some(Protocol::UDP),
        )?;
        if cfg.address.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        // Room for bursts of Initials and 1-RTT packets between two reads.
        let _ = socket.set_recv_buffer_size(4 << 20);
        let _ = socket.set_send_buffer_size(4 << 20);
        socket.bind(&cfg.address.into())?;
        UdpSocket::from_std(socket.into())
    }

    /// Start serving on `socket`.
    pub fn start(
        edge: &Arc<Edge>,
        cfg: ListenerConfig,
        socket: UdpSocket,
    ) -> std::io::Result<Arc<QuicListener>> {
        let name = cfg.name.clone();
        let m = &edge.metrics;
        let l = Arc::new(QuicListener {
            local_addr: socket.local_addr()?,
            socket: Arc::new(socket),
            stop: edge.hard_stop.child_token(),
            accepting: AtomicBool::new(true),
            flows: Mutex::new(Flows::default()),
            m: QuicMetrics {
                active: m.quic_flows_active.with_label_values(&[&name]),
                packets_in: m.quic_packets.with_label_values(&[&name, "from_client"]),
                packets_out: m.quic_packets.with_label_values(&[&name, "to_client"]),
                bytes_in: m.quic_bytes.with_label_values(&[&name, "from_client"]),
                bytes_out: m.quic_bytes.with_label_values(&[&name, "to_client"]),
                migrations: m.quic_migrations.with_label_values(&[&name]),
                timeouts: m.quic_initials.with_label_values(&[&name, "timeout"]),
            },
            config: ArcSwap::from_pointee(cfg),
        });
        tokio::spawn(receive(Arc::downgrade(edge), l.clone()));
        tokio::spawn(sweep(l.clone()));
        tracing::info!(listener = %name, address = %l.local_addr, "listening (QUIC)");
        Ok(l)
    }

    pub fn name(&self) -> String {
        self.config.load().name.clone()
    }

    /// No new flows from now on; established ones go on until they are idle, then the
    /// listener stops (a reload removed it, or sluice drains).
    pub fn close(&self) {
        self.accepting.store(false, Ordering::Release);
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Stop at once, dropping every flow.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn flow_count(&self) -> usize {
        self.lock().all.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Flows> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn initial(&self, edge: &Edge, result: &str) {
        edge.metrics
            .quic_initials
            .with_label_values(&[&self.config.load().name, result])
            .inc();
    }

    fn remove_flow(&self, flows: &mut Flows, flow: &Arc<Flow>) {
        if flows.all.remove(&flow.id).is_none() {
            return;
        }
        self.m.active.dec();
        let client = flow.client();
        if flows
            .by_client
            .get(&client)
            .is_some_and(|f| Arc::ptr_eq(f, flow))
        {
            flows.by_client.remove(&client);
        }
        for cid in flow.cids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if flows.by_cid.get(cid).is_some_and(|f| Arc::ptr_eq(f, flow)) {
                flows.by_cid.remove(cid);
            }
        }
        flow.route.active.dec();
        if let Some((t, port)) = &flow.terminator {
            t.unregister(*port);
        }
        flow.stop.cancel();
    }
}

/// The flow a client datagram belongs to: by its destination connection ID first (a client
/// may run several connections from one socket, and may move), then by its source address
/// (a short header with an ID sluice has not learned), then as a port rebinding. A new
/// Initial from a known address is a new connection: `None`.
fn find_flow(
    l: &QuicListener,
    flows: &mut Flows,
    peer: SocketAddr,
    data: &[u8],
) -> Option<Arc<Flow>> {
    if let Some(f) = flow_by_cid(flows, data) {
        let old = f.client();
        if old != peer {
            // A known connection from a new address: migration or NAT rebinding. (Only
            // someone on the path can know a connection ID.)
            if flows
                .by_client
                .get(&old)
                .is_some_and(|x| Arc::ptr_eq(x, &f))
            {
                flows.by_client.remove(&old);
            }
            flows.by_client.insert(peer, f.clone());
            f.set_client(peer);
            l.m.migrations.inc();
            tracing::debug!(from = %old, to = %peer, "QUIC flow followed to a new address");
        }
        return Some(f);
    }
    let long = match packet::parse_header(data) {
        Ok(Header::Long(long)) => Some(long),
        _ => None,
    };
    if let Some(long) = &long {
        // A new connection's Initial, or its 0-RTT/Handshake packets while its hello waits.
        if long.kind == Some(LongType::Initial)
            || flows.pending.contains_key(&(peer, long.dcid.to_vec()))
        {
            return None;
        }
    }
    match flows.by_client.get(&peer).cloned() {
        Some(f) => {
            learn_client_cid(flows, &f, data);
            Some(f)
        }
        None => port_rebinding(flows, peer, data).inspect(|_| l.m.migrations.inc()),
    }
}

/// The flow a datagram belongs to by its destination connection ID.
fn flow_by_cid(flows: &Flows, data: &[u8]) -> Option<Arc<Flow>> {
    match packet::parse_header(data).ok()? {
        Header::Long(l) => flows.by_cid.get(l.dcid).cloned(),
        Header::Short => flows
            .cid_lens
            .iter()
            .find_map(|&n| flows.by_cid.get(data.get(1..1 + n)?).cloned()),
        Header::VersionNegotiation { .. } => None,
    }
}

fn forward(l: &QuicListener, flow: &Flow, data: &[u8]) {
    flow.last_seen
        .store(clock_ms(Instant::now()), Ordering::Relaxed);
    l.m.packets_in.inc();
    l.m.bytes_in.inc_by(data.len() as u64);
    flow.route.bytes_to_backend.inc_by(data.len() as u64);
    // UDP: a full send buffer drops the datagram, as the network would. The syscall is made
    // directly: tokio's `try_send` answers WouldBlock until its reactor has seen the new
    // socket writable, which dropped the first Initial of new flows.
    let _ = socket2::SockRef::from(flow.upstream.as_ref()).send(data);
}

/// The receive loop: every datagram from clients.
async fn receive(edge: std::sync::Weak<Edge>, l: Arc<QuicListener>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, peer) = tokio::select! {
            _ = l.stop.cancelled() => break,
            r = l.socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "QUIC receive failed");
                    continue;
                }
            },
        };
        let data = &buf[..n];
        let Some(edge) = edge.upgrade() else { break };
        let known = {
            let mut flows = l.lock();
            find_flow(&l, &mut flows, peer, data)
        };
        match known {
            Some(flow) => forward(&l, &flow, data),
            None => new_datagram(&edge, &l, peer, data).await,
        }
    }
    // Stopped: every flow ends.
    let mut flows = l.lock();
    let all: Vec<Arc<Flow>> = flows.all.values().cloned().collect();
    for f in all {
        l.remove_flow(&mut flows, &f);
    }
    flows.pending.clear();
}

/// A short header from a new port of an address with exactly one flow, with a connection ID
/// sluice has not seen: the same client after a NAT (or socket) rebinding that also switched
/// to a fresh connection ID, as RFC 9000 §9.5 asks of a migrating endpoint. The IDs the
/// server issued later travel encrypted, so this is the one way to follow such a move without
/// the server's help. With two flows from that address it is ambiguous and not followed.
fn port_rebinding(flows: &mut Flows, peer: SocketAddr, data: &[u8]) -> Option<Arc<Flow>> {
    if data.first().is_none_or(|b| b & 0xc0 != 0x40) {
        return None;
    }
    let mut same_ip = flows.all.values().filter(|f| f.client().ip() == peer.ip());
    let flow = same_ip.next()?.clone();
    if same_ip.next().is_some() {
        return None;
    }
    let old = flow.client();
    if flows
        .by_client
        .get(&old)
        .is_some_and(|f| Arc::ptr_eq(f, &flow))
    {
        flows.by_client.remove(&old);
    }
    flows.by_client.insert(peer, flow.clone());
    flow.set_client(peer);
    tracing::debug!(from = %old, to = %peer, "QUIC flow followed to a new port");
    Some(flow)
}

/// A client's short header on its known path may carry a connection ID the server issued
/// later (NEW_CONNECTION_ID is encrypted): remember it, so a move to a new address that
/// uses it is still followed. Called when `flow_by_cid` found no known ID in the datagram.
fn learn_client_cid(flows: &mut Flows, flow: &Arc<Flow>, data: &[u8]) {
    if data.first().is_none_or(|b| b & 0x80 != 0) {
        return;
    }
    // Only with one known length is the ID's extent certain.
    if flows.cid_lens.len() != 1 {
        return;
    }
    let n = flows.cid_lens.first().copied().unwrap_or(0);
    if let Some(cid) = data.get(1..1 + n) {
        remember_cid(flows, flow, cid);
    }
}

/// Map `cid` to `flow`, at most `CIDS_PER_FLOW` per flow; an ID already known stays with its
/// flow. Returns whether it was added.
fn remember_cid(flows: &mut Flows, flow: &Arc<Flow>, cid: &[u8]) -> bool {
    if flows.by_cid.contains_key(cid) {
        return false;
    }
    let mut cids = flow.cids.lock().unwrap_or_else(|e| e.into_inner());
    if cids.len() >= CIDS_PER_FLOW {
        return false;
    }
    cids.push(cid.to_vec());
    flows.by_cid.insert(cid.to_vec(), flow.clone());
    true
}

/// A datagram from an address with no flow: an Initial starts (or continues) a pending flow;
/// once its hello is complete, the flow is established.
async fn new_datagram(edge: &Arc<Edge>, l: &Arc<QuicListener>, peer: SocketAddr, data: &[u8]) {
    if let Some((pending, hello)) = admit(edge, l, peer, data) {
        establish(edge, l, peer, pending, hello).await;
    }
}

/// The synchronous part of `new_datagram` (the flow table's lock is never held across an
/// await): `Some` when a hello is complete. A refusal is counted under its reason.
fn admit(
    edge: &Arc<Edge>,
    l: &Arc<QuicListener>,
    peer: SocketAddr,
    data: &[u8],
) -> Option<(Pending, sluice_core::hello::ClientHello)> {
    match admit_inner(l, peer, data, edge.accepting_new()) {
        Ok(done) => done,
        Err(reason) => {
            l.initial(edge, reason);
            None
        }
    }
}

fn admit_inner(
    l: &QuicListener,
    peer: SocketAddr,
    data: &[u8],
    accepting: bool,
) -> Result<Option<(Pending, sluice_core::hello::ClientHello)>, &'static str> {
    let cfg = l.config.load();
    let long = match packet::parse_header(data).map_err(|_| "malformed")? {
        Header::Long(long) => long,
        Header::Short => return Err("unknown_flow"),
        Header::VersionNegotiation { .. } => return Err("not_initial"),
    };
    let mut flows = l.lock();
    let key = (peer, long.dcid.to_vec());
    if long.kind != Some(LongType::Initial) {
        // 0-RTT or Handshake packets of a client whose hello is still incomplete wait with it.
        let Some(p) = flows.pending.get_mut(&key) else {
            return Err(if long.kind.is_none() {
                "unsupported_version"
            } else {
                "not_initial"
            });
        };
        if p.datagrams.len() < PENDING_DATAGRAMS && p.bytes + data.len() <= PENDING_BYTES {
            p.bytes += data.len();
            p.datagrams.push(data.to_vec());
            return Ok(None);
        }
        flows.pending.remove(&key);
        return Err("pending_overflow");
    }
    if !l.is_accepting() || !accepting {
        return Err("draining");
    }
    if data.len() < 1200 {
        // RFC 9000 §14.1: a client pads its Initial datagrams to 1200 bytes.
        return Err("too_short");
    }
    if long.dcid.len() < 8 {
        return Err("malformed");
    }
    if flows
        .pending
        .get(&key)
        .is_some_and(|p| p.version != long.version)
    {
        flows.pending.remove(&key);
    }
    if !flows.pending.contains_key(&key) {
        if flows.pending.len() >= cfg.quic.max_pending {
            return Err("pending_full");
        }
        let keys =
            packet::client_initial_keys(long.version, long.dcid).ok_or("unsupported_version")?;
        flows.pending.insert(
            key.clone(),
            Pending {
                version: long.version,
                dcid: long.dcid.to_vec(),
                keys,
                crypto: CryptoStream::default(),
                datagrams: Vec::new(),
                bytes: 0,
                started: clock_ms(Instant::now()),
            },
        );
    }
    let Some(p) = flows.pending.get_mut(&key) else {
        return Ok(None);
    };
    let plain = match packet::decrypt_initial(&data[..long.len], &long, &p.keys) {
        Ok(plain) => plain,
        Err(_) => {
            if p.datagrams.is_empty() {
                flows.pending.remove(&key);
            }
            return Err("decrypt_failed");
        }
    };
    let Ok(frames) = packet::crypto_frames(&plain) else {
        flows.pending.remove(&key);
        return Err("malformed");
    };
    for (offset, bytes) in frames {
        if p.crypto.add(offset, bytes, cfg.max_hello_size).is_err() {
            flows.pending.remove(&key);
            return Err("too_large");
        }
    }
    if p.datagrams.len() >= PENDING_DATAGRAMS || p.bytes + data.len() > PENDING_BYTES {
        flows.pending.remove(&key);
        return Err("pending_overflow");
    }
    p.bytes += data.len();
    p.datagrams.push(data.to_vec());
    let hello = match packet::parse_hello(&p.crypto.prefix()) {
        Parse::Incomplete { .. } => return Ok(None),
        Parse::Hello { hello, .. } => hello,
        Parse::NotTls | Parse::Malformed(_) => {
            flows.pending.remove(&key);
            return Err("malformed");
        }
    };
    let Some(pending) = flows.pending.remove(&key) else {
        return Ok(None);
    };
    if flows.all.len() >= cfg.quic.max_flows {
        return Err("table_full");
    }
    Ok(Some((pending, hello)))
}

/// Route a complete hello, open the flow's socket toward its backend, replay what waited.
async fn establish(
    edge: &Arc<Edge>,
    l: &Arc<QuicListener>,
    peer: SocketAddr,
    pending: Pending,
    hello: sluice_core::hello::ClientHello,
) {
    let name = l.name();
    let snapshot = edge.snapshot();
    let facts = Facts {
        listener: &name,
        tls: Some(TlsFacts {
            sni: hello.sni.as_deref(),
            alpn: &hello.alpn,
        }),
    };
    let Some(route) = snapshot.routes.select(&facts).cloned() else {
        edge.metrics
            .route_decisions
            .with_label_values(&[&name, "none"])
            .inc();
        return l.initial(edge, "no_route");
    };
    edge.metrics
        .route_decisions
        .with_label_values(&[&name, &route.name])
        .inc();
    let Target::Pool(pool) = &route.target else {
        tracing::warn!(listener = %name, route = %route.name,
            "a QUIC flow matched a route whose target is not a pool; QUIC goes to pools only");
        return l.initial(edge, "unsupported_target");
    };
    // Terminated: the flow goes to the route's quinn endpoint; else to a backend.
    let (target, guard, label) = match route.terminator.get() {
        Some(t) => (t.address, None, "sluice (terminated)".to_owned()),
        None if route.is_terminated() => return l.initial(edge, "backend_error"),
        None => {
            let list = pool.backends();
            let Some(i) = pool.pick(&list, &[], peer, hello.sni.as_deref(), rand::random()) else {
                return l.initial(edge, "no_backend");
            };
            let b = &list[i];
            (b.address, Some(b.guard()), b.name.clone())
        }
    };
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a UDP socket toward a QUIC backend");
            return l.initial(edge, "backend_error");
        }
    };
    if let Err(e) = upstream.connect(target).await {
        tracing::warn!(backend = %label, error = %e, "cannot reach a QUIC backend");
        return l.initial(edge, "backend_error");
    }
    let terminator = match (route.terminator.get(), upstream.local_addr()) {
        (Some(t), Ok(local)) => {
            t.register(local.port(), peer);
            Some((t.clone(), local.port()))
        }
        _ => None,
    };
    let id = {
        let mut flows = l.lock();
        flows.next_id += 1;
        flows.next_id
    };
    let flow = Arc::new(Flow {
        id,
        route: route.clone(),
        _guard: guard,
        terminator,
        upstream: Arc::new(upstream),
        client: Mutex::new(peer),
        last_seen: AtomicU64::new(clock_ms(Instant::now())),
        // The client addresses its Initials to this ID until the server answers.
        cids: Mutex::new(vec![pending.dcid.clone()]),
        stop: l.stop.child_token(),
    });
    {
        let mut flows = l.lock();
        // The address's newest connection answers for it when a datagram carries no known ID;
        // an older one from the same socket goes on by its connection IDs.
        flows.all.insert(flow.id, flow.clone());
        flows.by_client.insert(peer, flow.clone());
        flows.by_cid.insert(pending.dcid.clone(), flow.clone());
    }
    l.m.active.inc();
    route.active.inc();
    l.initial(edge, "ok");
    edge.metrics
        .quic_flows
        .with_label_values(&[&name, &route.name])
        .inc();
    tracing::debug!(listener = %name, client = %peer, route = %route.name,
        backend = %label, sni = ?hello.sni, alpn = ?hello.alpn, "QUIC flow");
    for d in &pending.datagrams {
        forward(l, &flow, d);
    }
    tokio::spawn(from_backend(l.clone(), flow));
}

thread_local! {
    /// The buffer backend datagrams are read into: one per worker thread, not one per flow,
    /// so an idle flow holds none (as an idle TCP relay holds no buffer).
    static DATAGRAM: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Datagrams from a flow's backend, to its client (wherever it is now).
async fn from_backend(l: Arc<QuicListener>, flow: Arc<Flow>) {
    loop {
        tokio::select! {
            _ = flow.stop.cancelled() => break,
            r = flow.upstream.readable() => if r.is_err() { break },
        }
        // Drain what is there without awaiting, so the buffer is never held across a wait.
        loop {
            let got = DATAGRAM.with(|b| {
                let mut b = b.borrow_mut();
                let n = flow.upstream.try_recv(&mut b)?;
                to_client(&l, &flow, &b[..n]);
                Ok::<_, std::io::Error>(())
            });
            match got {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // An ICMP error from the backend (not listening yet): keep the flow; the
                // client retransmits and the flow expires if nothing ever answers.
                Err(_) => break,
            }
        }
    }
}

/// One datagram from the backend: learn the server's connection ID, send it to the client.
fn to_client(l: &QuicListener, flow: &Arc<Flow>, data: &[u8]) {
    // Server long headers carry the connection ID the client will address it by.
    if let Ok(Header::Long(long)) = packet::parse_header(data) {
        if !long.scid.is_empty() {
            let mut flows = l.lock();
            if remember_cid(&mut flows, flow, long.scid) {
                flows.cid_lens.insert(long.scid.len());
            }
        }
    }
    flow.last_seen
        .store(clock_ms(Instant::now()), Ordering::Relaxed);
    l.m.packets_out.inc();
    l.m.bytes_out.inc_by(data.len() as u64);
    flow.route.bytes_to_client.inc_by(data.len() as u64);
    let to = socket2::SockAddr::from(flow.client());
    let _ = socket2::SockRef::from(l.socket.as_ref()).send_to(data, &to);
}

/// Expire idle flows and stale pending ones; stop a closed listener once it has no flows.
async fn sweep(l: Arc<QuicListener>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = l.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let cfg = l.config.load();
        let now = clock_ms(Instant::now());
        let idle = cfg.quic.flow_idle_timeout.as_millis() as u64;
        let hello = cfg.hello_timeout.as_millis() as u64;
        let mut flows = l.lock();
        let expired: Vec<Arc<Flow>> = flows
            .all
            .values()
            .filter(|f| now.saturating_sub(f.last_seen.load(Ordering::Relaxed)) >= idle)
            .cloned()
            .collect();
        for f in &expired {
            l.remove_flow(&mut flows, f);
        }
        let before = flows.pending.len();
        flows
            .pending
            .retain(|_, p| now.saturating_sub(p.started) < hello);
        let timed_out = before - flows.pending.len();
        let empty = flows.all.is_empty();
        drop(flows);
        l.m.timeouts.inc_by(timed_out as u64);
        if !expired.is_empty() {
            tracing::debug!(listener = %cfg.name, flows = expired.len(), "QUIC flows expired");
        }
        if empty && !l.is_accepting() {
            l.stop();
        }
    }
}
