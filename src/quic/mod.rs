//! QUIC passthrough on UDP: route a QUIC connection by the SNI and ALPN of its ClientHello,
//! read from the client's Initial packets, and forward its datagrams unchanged.
//!
//! Owns: the UDP socket of a `protocol = "quic"` listener, the flow table (client address →
//! backend; server connection IDs → flow, for migration and NAT rebinding), pending flows
//! (Initials waiting for the rest of the hello, bounded), one connected UDP socket per flow
//! toward its backend (so replies find their way back), flow expiry, and the QUIC metrics.
//! It never decrypts anything but the client's Initials, and never changes a byte: TLS stays
//! end to end. The packet logic is in `packet` (pure).
//!
//! Datagrams move in batches, with the kernel's offloads through quinn-udp: a read takes up
//! to `BATCH` messages (`recvmmsg`), each of them possibly several datagrams of one sender
//! coalesced by UDP GRO; a run of datagrams of one flow goes out in one `sendmsg` with UDP GSO
//! (segment by segment where the kernel cannot). Datagrams are handled in the order they were
//! read, so a flow's datagrams are never reordered; the ECN bits are carried over. The flows'
//! backend sockets are not tokio tasks: they are registered in one epoll set per listener
//! (mio), which one task waits on, so an idle flow costs its table entries and a socket.
//!
//! In a binary upgrade the old and the new process serve one socket for a while, each with
//! flows of its own; `clients` passes what one cannot place to the other.

mod clients;
pub mod terminate;

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};
use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::edge::connection::Edge;
use crate::snapshot::{Route, Target};
use crate::upstream::{clock_ms, ActiveGuard};
use sluice_core::close::CloseReason;
use sluice_core::quic::flows::{self, FlowState, FlowTable, Pending};
use sluice_core::route::{Facts, TlsFacts};

/// The largest read: one datagram, or the datagrams GRO coalesced (the kernel stops at 64 KB).
const MAX_READ: usize = 65535;
/// Messages per `recvmmsg` on a listener socket.
const BATCH: usize = if quinn_udp::BATCH_SIZE < 8 {
    quinn_udp::BATCH_SIZE
} else {
    8
};

/// One client's QUIC connection, routed.
struct Flow {
    /// Its client, connection IDs and last datagram, as the flow table keeps them.
    state: FlowState,
    route: Arc<Route>,
    /// Counts the flow on its backend (least_conn, p2c, the active gauge); none when sluice
    /// terminates the flow (its streams count on the backends they reach).
    _guard: Option<ActiveGuard>,
    /// A terminated flow: its endpoint and this flow's socket port there (for PROXY headers).
    terminator: Option<(Arc<terminate::Terminator>, u16)>,
    /// Connected to `backend`, non-blocking, in the listener's epoll set under the flow's id.
    upstream: std::net::UdpSocket,
    backend: SocketAddr,
    /// For its access-log line.
    log: FlowLog,
}

/// What a flow's access-log line says besides its state: written once, when it ends.
struct FlowLog {
    started: Instant,
    /// `sni '\n' alpn,alpn`, as the TCP record keeps them.
    names: Box<str>,
    backend: Box<str>,
    to_backend: AtomicU64,
    to_client: AtomicU64,
}

impl Flow {
    fn emit(&self, listener: &str, end: CloseReason) {
        let (sni, alpn) = self.log.names.split_once('\n').unwrap_or(("-", "-"));
        tracing::info!(
            target: "sluice::access",
            flow = self.state.id(),
            protocol = "quic",
            client = %self.state.client(),
            listener,
            sni,
            alpn,
            route = self.route.name.as_str(),
            pool = self.route.pool_name(),
            backend = &*self.log.backend,
            bytes_to_backend = self.log.to_backend.load(Ordering::Relaxed),
            bytes_to_client = self.log.to_client.load(Ordering::Relaxed),
            duration_ms = self.log.started.elapsed().as_millis() as u64,
            end = end.label(),
            "QUIC flow closed"
        );
    }
}

impl flows::Flow for Flow {
    fn state(&self) -> &FlowState {
        &self.state
    }

    /// The client moved (migration, rebinding): a terminated flow's endpoint must know.
    fn moved(&self, peer: SocketAddr) {
        if let Some((t, port)) = &self.terminator {
            t.register(*port, peer);
        }
    }
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
    flows: Mutex<FlowTable<Flow>>,
    m: QuicMetrics,
    /// The offloads the kernel has (GSO, GRO, ECN), for the listener's socket and the flows'.
    udp: UdpSocketState,
    /// The epoll set of the flows' backend sockets (token: the flow's id).
    registry: mio::Registry,
    /// Upgrade: the socket pair's end toward the other process, until the receive loop
    /// takes it (`relay_changed` tells it).
    relay: Mutex<Option<UnixDatagram>>,
    has_relay: AtomicBool,
    /// Set once the new process is ready: this one no longer reads the listener's socket.
    handed_over: AtomicBool,
    relay_changed: tokio::sync::Notify,
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
    /// `sluice_quic_handover_datagrams_total{direction}`: asked about across (`sent`), served
    /// here when asked (`received`), asked about and sent back (`returned`), lost (`dropped`).
    handover_sent: IntCounter,
    handover_received: IntCounter,
    handover_returned: IntCounter,
    handover_dropped: IntCounter,
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

    /// A UDP socket bound by someone else (systemd socket activation), made ready to serve.
    pub fn adopt(socket: std::net::UdpSocket) -> std::io::Result<UdpSocket> {
        let sock = socket2::Socket::from(socket);
        sock.set_nonblocking(true)?;
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        UdpSocket::from_std(sock.into())
    }

    /// Start serving on `socket`; `relay`: in an upgrade, the socket pair's end toward the
    /// old process (in place before the first datagram is read).
    pub fn start(
        edge: &Arc<Edge>,
        cfg: ListenerConfig,
        socket: UdpSocket,
        relay: Option<UnixDatagram>,
    ) -> std::io::Result<Arc<QuicListener>> {
        let name = cfg.name.clone();
        let m = &edge.metrics;
        let udp = UdpSocketState::new(UdpSockRef::from(&socket))?;
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let l = Arc::new(QuicListener {
            udp,
            registry,
            local_addr: socket.local_addr()?,
            socket: Arc::new(socket),
            stop: edge.hard_stop.child_token(),
            accepting: AtomicBool::new(true),
            flows: Mutex::new(FlowTable::default()),
            m: QuicMetrics {
                active: m.quic_flows_active.with_label_values(&[&name]),
                packets_in: m.quic_packets.with_label_values(&[&name, "from_client"]),
                packets_out: m.quic_packets.with_label_values(&[&name, "to_client"]),
                bytes_in: m.quic_bytes.with_label_values(&[&name, "from_client"]),
                bytes_out: m.quic_bytes.with_label_values(&[&name, "to_client"]),
                migrations: m.quic_migrations.with_label_values(&[&name]),
                timeouts: m.quic_initials.with_label_values(&[&name, "timeout"]),
                handover_sent: m.quic_handover.with_label_values(&[&name, "sent"]),
                handover_received: m.quic_handover.with_label_values(&[&name, "received"]),
                handover_returned: m.quic_handover.with_label_values(&[&name, "returned"]),
                handover_dropped: m.quic_handover.with_label_values(&[&name, "dropped"]),
            },
            config: ArcSwap::from_pointee(cfg),
            relay: Mutex::new(None),
            has_relay: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            relay_changed: tokio::sync::Notify::new(),
        });
        if let Some(peer) = relay {
            l.set_relay(peer);
        }
        tokio::spawn(clients::receive(Arc::downgrade(edge), l.clone()));
        // SAFETY: the `mio::Poll` owns its epoll descriptor for its whole life and never
        // replaces it; the AsyncFd owns the Poll (as in `edge::parking`).
        #[allow(unsafe_code)]
        let epoll = unsafe { AsyncFd::register_with_interest(poll, Interest::READABLE) }?;
        tokio::spawn(from_backends(l.clone(), epoll));
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

    /// Upgrade: `peer` is the other process's end of the socket pair; datagrams of flows
    /// this process does not have go to it, and what comes from it is served here.
    pub fn set_relay(&self, peer: UnixDatagram) {
        *self.relay.lock().unwrap_or_else(|e| e.into_inner()) = Some(peer);
        self.has_relay.store(true, Ordering::Release);
        self.relay_changed.notify_one();
    }

    /// Upgrade: the new process is ready. This one stops reading the socket (its flows'
    /// datagrams come across from the new one) and takes no new flows. Without a peer
    /// (this listener was not handed over) it only stops taking new flows.
    pub fn hand_over(&self) {
        self.close();
        if self.has_relay.load(Ordering::Acquire) {
            // A hello waiting here could never complete (no new flows): its client's
            // retransmissions go to the new process whole instead.
            let dropped = self.lock().drop_pending();
            if dropped > 0 {
                tracing::info!(listener = %self.name(), hellos = dropped,
                    "upgrade: incomplete hellos left to the new process");
            }
            self.handed_over.store(true, Ordering::Release);
            self.relay_changed.notify_one();
        }
    }

    /// Stop at once, dropping every flow.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn flow_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FlowTable<Flow>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn initial(&self, edge: &Edge, result: &str) {
        edge.metrics
            .quic_initials
            .with_label_values(&[&self.config.load().name, result])
            .inc();
    }

    fn remove_flow(&self, flows: &mut FlowTable<Flow>, flow: &Arc<Flow>, end: CloseReason) {
        if !flows.remove(flow) {
            return;
        }
        flow.emit(&self.config.load().name, end);
        self.m.active.dec();
        flow.route.active.dec();
        if let Some((t, port)) = &flow.terminator {
            t.unregister(*port);
        }
        // Out of the epoll set now: a reference the backend task still holds may keep the
        // socket open a little longer, and its events must not outlive the flow.
        let _ =
            self.registry
                .deregister(&mut mio::unix::SourceFd(&std::os::fd::AsRawFd::as_raw_fd(
                    &flow.upstream,
                )));
    }
}

/// `data`, datagrams of `stride` bytes (the last may be shorter) from one sender, to `to` in
/// one `sendmsg` with UDP GSO where the kernel has it, else in as many as it takes. A full
/// send buffer drops them, as the network would (QUIC retransmits).
fn send_segments(
    udp: &UdpSocketState,
    socket: &impl std::os::fd::AsFd,
    to: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: &[u8],
    stride: usize,
) {
    let stride = stride.clamp(1, MAX_READ);
    let per_send = stride * udp.max_gso_segments().max(1);
    for chunk in data.chunks(per_send) {
        let transmit = Transmit {
            destination: to,
            ecn,
            contents: chunk,
            segment_size: (chunk.len() > stride).then_some(stride),
            src_ip: None,
        };
        if udp.send(UdpSockRef::from(socket), &transmit).is_err() {
            return;
        }
    }
}

/// What one read put in `buf`: the bytes, and the size of each datagram in them (GRO's
/// segment size; the whole read when it is one datagram).
fn datagrams<'b>(meta: &RecvMeta, buf: &'b [u8]) -> (&'b [u8], usize) {
    let data = &buf[..meta.len.min(buf.len())];
    let stride = if meta.stride == 0 {
        data.len()
    } else {
        meta.stride
    };
    (data, stride)
}

/// How many datagrams of `stride` bytes `data` holds (the last may be shorter).
fn count(data: &[u8], stride: usize) -> u64 {
    data.len().div_ceil(stride.max(1)) as u64
}

/// Datagrams of one flow from its client, in order, to its backend.
fn forward(
    l: &QuicListener,
    flow: &Flow,
    data: &[u8],
    stride: usize,
    ecn: Option<EcnCodepoint>,
    now: u64,
) {
    flow.state.seen(now);
    let bytes = data.len() as u64;
    l.m.packets_in.inc_by(count(data, stride));
    l.m.bytes_in.inc_by(bytes);
    flow.route.bytes_to_backend.inc_by(bytes);
    flow.log.to_backend.fetch_add(bytes, Ordering::Relaxed);
    send_segments(&l.udp, &flow.upstream, flow.backend, ecn, data, stride);
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
    if !route.acl.permits(peer.ip()) {
        let denied = edge
            .metrics
            .access_denied
            .with_label_values(&["route", &route.name]);
        denied.inc();
        return l.initial(edge, "denied");
    }
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
    let upstream = match backend_socket(target) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(backend = %label, error = %e, "cannot open a UDP socket toward a QUIC backend");
            return l.initial(edge, "backend_error");
        }
    };
    let terminator = match (route.terminator.get(), upstream.local_addr()) {
        (Some(t), Ok(local)) => {
            t.register(local.port(), peer);
            Some((t.clone(), local.port()))
        }
        _ => None,
    };
    let id = l.lock().next_id();
    let flow = Arc::new(Flow {
        state: FlowState::new(id, peer, &pending.dcid, clock_ms(Instant::now())),
        route: route.clone(),
        _guard: guard,
        terminator,
        upstream,
        backend: target,
        log: FlowLog {
            started: Instant::now(),
            names: format!(
                "{}\n{}",
                hello.sni.as_deref().unwrap_or("-"),
                if hello.alpn.is_empty() {
                    "-".to_owned()
                } else {
                    hello.alpn.join(",")
                }
            )
            .into_boxed_str(),
            backend: label.clone().into_boxed_str(),
            to_backend: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        },
    });
    l.lock().insert(flow.clone());
    // In the epoll set once in the table (its events look it up), before anything reaches the
    // backend (so no answer comes before).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&flow.upstream);
    if let Err(e) = l.registry.register(
        &mut mio::unix::SourceFd(&fd),
        mio::Token(id as usize),
        mio::Interest::READABLE,
    ) {
        tracing::warn!(error = %e, "cannot watch a QUIC flow's backend socket");
        l.lock().remove(&flow);
        return l.initial(edge, "backend_error");
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
    let now = clock_ms(Instant::now());
    for d in &pending.datagrams {
        forward(l, &flow, d, d.len(), None, now);
    }
}

/// A flow's socket toward `target`: its own port (the backend's answers come back to it),
/// connected, non-blocking, with GRO and the ECN and path-MTU options quinn-udp sets.
fn backend_socket(target: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(target),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    socket.bind(&bind.into())?;
    socket.connect(&target.into())?;
    let socket = std::net::UdpSocket::from(socket);
    // Sets the options; the capabilities it finds are the listener's too.
    UdpSocketState::new(UdpSockRef::from(&socket))?;
    Ok(socket)
}

/// Datagrams from the flows' backends, to their clients (wherever they are now): one task
/// per listener waits on the epoll set of every flow's socket.
async fn from_backends(l: Arc<QuicListener>, mut poll: AsyncFd<mio::Poll>) {
    let mut events = mio::Events::with_capacity(256);
    // One buffer for the listener: an idle flow holds none.
    let mut buf = vec![0u8; MAX_READ];
    loop {
        let mut ready = tokio::select! {
            _ = l.stop.cancelled() => return,
            r = poll.readable_mut() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "QUIC backend sockets cannot be watched");
                    return;
                }
            },
        };
        // Until the set is empty: the runtime reports the epoll fd again only for new
        // readiness.
        loop {
            match ready
                .get_inner_mut()
                .poll(&mut events, Some(Duration::ZERO))
            {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "epoll_wait on QUIC backend sockets failed");
                    return;
                }
            }
            if events.is_empty() {
                ready.clear_ready();
                break;
            }
            for event in events.iter() {
                let flow = l.lock().get(event.token().0 as u64);
                if let Some(flow) = flow {
                    drain_backend(&l, &flow, &mut buf);
                }
            }
            // Many flows answering at once: let this worker's other tasks run between batches.
            tokio::task::yield_now().await;
        }
    }
}

/// Read a flow's socket until it is empty (the epoll set is edge-triggered), sending every
/// read on to the client.
fn drain_backend(l: &QuicListener, flow: &Arc<Flow>, buf: &mut [u8]) {
    let mut meta = [RecvMeta::default()];
    loop {
        let got = l.udp.recv(
            UdpSockRef::from(&flow.upstream),
            &mut [IoSliceMut::new(buf)],
            &mut meta,
        );
        match got {
            Ok(_) => {
                let (data, stride) = datagrams(&meta[0], buf);
                to_client(l, flow, data, stride, meta[0].ecn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // An ICMP error from the backend (not listening yet): keep the flow; the client
            // retransmits and the flow expires if nothing ever answers.
            Err(_) => continue,
        }
    }
}

/// Datagrams from the backend: learn the server's connection IDs, send them to the client.
fn to_client(
    l: &QuicListener,
    flow: &Arc<Flow>,
    data: &[u8],
    stride: usize,
    ecn: Option<EcnCodepoint>,
) {
    // Server long headers carry the connection ID the client will address it by.
    for segment in data.chunks(stride.max(1)) {
        if segment.first().is_some_and(|b| b & 0x80 != 0) {
            l.lock().from_server(flow, segment);
        }
    }
    flow.state.seen(clock_ms(Instant::now()));
    let bytes = data.len() as u64;
    l.m.packets_out.inc_by(count(data, stride));
    l.m.bytes_out.inc_by(bytes);
    flow.route.bytes_to_client.inc_by(bytes);
    flow.log.to_client.fetch_add(bytes, Ordering::Relaxed);
    send_segments(&l.udp, &*l.socket, flow.state.client(), ecn, data, stride);
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
        let (expired, timed_out) = flows.expire(now, idle, hello);
        for f in &expired {
            l.remove_flow(&mut flows, f, CloseReason::IdleTimeout);
        }
        let empty = flows.is_empty();
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
