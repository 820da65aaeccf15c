//! Datagrams from clients: the listener's receive loop (batches of `recvmmsg` with GRO),
//! placing each datagram in its flow or starting one with it, and in a binary upgrade the
//! socket pair to the other process.
//!
//! In an upgrade both processes serve the listener's socket for a while, and each flow lives
//! in one of them: the old process hands the socket over with one end of a Unix
//! `SOCK_SEQPACKET` pair. From then on a datagram its reader cannot place by connection ID
//! (or as part of a hello pending there) is asked about across first (`Ask`): the other
//! process serves it if it is surely its own (by ID, pending hello, or its client's exact
//! address when the asker has no flow there), else sends it back (`Returned`), and only then
//! does the reader place it by address, follow a rebinding or start a new flow with it. Once
//! the new process is ready the old one stops reading the socket and serves its flows with
//! what comes across, until they are idle; if the new process goes away it reads the socket
//! again. Nothing crosses twice.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use quinn_udp::{EcnCodepoint, RecvMeta, UdpSockRef};
use tokio::io::Interest;

use super::{count, datagrams, establish, forward, Flow, QuicListener, BATCH, MAX_READ};
use crate::edge::connection::Edge;
use crate::upstream::clock_ms;
use sluice_core::close::CloseReason;
use sluice_core::quic::flows::{Found, Limits, Pending};
use sluice_core::quic::handover as relayed;

/// The other process in an upgrade, as the receive loop holds it: a `SOCK_SEQPACKET` pair's
/// end (message boundaries kept, and an end of file when the other process is gone), driven
/// through tokio's datagram type (plain `send`/`recv`).
struct Relay {
    sock: tokio::net::UnixDatagram,
    /// A message being read or written: header and datagrams.
    buf: Vec<u8>,
}

/// What became of a datagram passed across.
enum Passed {
    Sent,
    /// The pair's buffer is full: dropped, as the network would.
    Full,
    /// The other process is gone.
    Gone,
}

impl Relay {
    fn send(
        &mut self,
        kind: relayed::Kind,
        client: SocketAddr,
        ecn: Option<EcnCodepoint>,
        data: &[u8],
        stride: usize,
    ) -> Passed {
        let stride = u16::try_from(stride).unwrap_or(u16::MAX);
        relayed::encode_header(
            &mut self.buf,
            kind,
            client,
            ecn.map_or(0, |e| e as u8),
            stride,
        );
        self.buf.extend_from_slice(data);
        match self.sock.try_send(&self.buf) {
            Ok(_) => Passed::Sent,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Passed::Full,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Passed::Full,
            Err(_) => Passed::Gone,
        }
    }
}

/// What woke the receive loop.
enum Woke {
    Socket(std::io::Result<usize>),
    Relay(std::io::Result<usize>),
    RelayChanged,
}

/// The receive loop: every datagram from clients, read in batches (and, in an upgrade, what
/// the other process passes across).
pub(super) async fn receive(edge: std::sync::Weak<Edge>, l: Arc<QuicListener>) {
    let mut storage = vec![0u8; MAX_READ * BATCH];
    let mut metas = [RecvMeta::default(); BATCH];
    let mut relay: Option<Relay> = None;
    let mut reading = true;
    // The other process said it hands its part on to a newer one: its end of file then
    // means nothing will come, not that it died.
    let mut left = false;
    loop {
        // In this order: a socket pair end handed in is taken before the first datagram is
        // placed without it, and what came back across (bounded by what was asked) before
        // more is read.
        let woke = tokio::select! {
            biased;
            _ = l.stop.cancelled() => break,
            _ = l.relay_changed.notified() => Woke::RelayChanged,
            r = async {
                let r = relay.as_mut().expect("guarded by the select condition");
                r.buf.resize(relayed::MAX_HEADER + MAX_READ, 0);
                r.sock.recv(&mut r.buf).await
            }, if relay.is_some() => Woke::Relay(r),
            r = l.socket.readable(), if reading => Woke::Socket(r.and_then(|()| {
                let mut bufs: Vec<IoSliceMut<'_>> =
                    storage.chunks_mut(MAX_READ).map(IoSliceMut::new).collect();
                l.socket.try_io(Interest::READABLE, || {
                    l.udp.recv(UdpSockRef::from(&*l.socket), &mut bufs, &mut metas)
                })
            })),
        };
        let Some(edge) = edge.upgrade() else { break };
        match woke {
            Woke::RelayChanged => {
                let peer = l.relay.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(peer) = peer {
                    match peer
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::UnixDatagram::from_std(peer))
                    {
                        Ok(sock) => {
                            // A newer process takes over while an older one still serves
                            // flows (one generation is followed): tell the older one, so
                            // that it does not take the pair's end for its successor's death.
                            if let Some(older) = relay.take() {
                                let _ = older.sock.try_send(&relayed::LEAVE);
                                tracing::warn!(listener = %l.name(),
                                    "upgrade: a newer process takes over; the flows of the one before this one get no more datagrams");
                            }
                            left = false;
                            relay = Some(Relay {
                                sock,
                                buf: Vec::new(),
                            })
                        }
                        Err(e) => tracing::error!(listener = %l.name(), error = %e,
                            "upgrade: cannot use the socket toward the other process"),
                    }
                }
                // Only with the other process there: if it is gone (or dropped its end, as
                // it does when its config moved the listener), the end of file below turns
                // reading back on.
                if l.handed_over.load(Ordering::Acquire) && relay.is_some() && reading {
                    reading = false;
                    tracing::info!(listener = %l.name(),
                        "upgrade: the new process reads the QUIC socket; serving this one's flows with what it passes across");
                }
            }
            Woke::Socket(Ok(messages)) => {
                for (meta, buf) in metas[..messages].iter().zip(storage.chunks(MAX_READ)) {
                    let (data, stride) = datagrams(meta, buf);
                    from_client(&edge, &l, meta.addr, data, stride, meta.ecn, &mut relay).await;
                }
            }
            Woke::Socket(Err(e)) => {
                if e.kind() != std::io::ErrorKind::WouldBlock {
                    tracing::debug!(error = %e, "QUIC receive failed");
                }
            }
            Woke::Relay(Ok(n)) if n > 0 => {
                let msg = relay.as_ref().map_or(&[][..], |r| &r.buf[..n]);
                match relayed::decode(msg) {
                    Ok(relayed::Message::Datagrams(m)) => {
                        // Owned: answering may need `relay`.
                        let data = m.data.to_vec();
                        let (kind, client) = (m.kind, m.client);
                        let stride = usize::from(m.stride).max(1);
                        let ecn = EcnCodepoint::from_bits(m.ecn);
                        across(&edge, &l, &mut relay, kind, client, &data, stride, ecn).await;
                    }
                    Ok(relayed::Message::Leave) => left = true,
                    Err(why) => {
                        l.m.handover_dropped.inc();
                        tracing::warn!(listener = %l.name(), reason = why,
                            "upgrade: a malformed message from the other process");
                    }
                }
            }
            // End of file, or an error: the other process is gone.
            Woke::Relay(r) => {
                if r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock)
                {
                    continue;
                }
                relay = None;
                if reading {
                    tracing::info!(listener = %l.name(), "upgrade: the other process is gone");
                } else if left {
                    tracing::warn!(listener = %l.name(),
                        "upgrade: a newer process took over; this one's flows end when idle");
                } else {
                    reading = true;
                    tracing::warn!(listener = %l.name(),
                        "upgrade: the new process is gone; reading the QUIC socket again");
                }
            }
        }
    }
    // Stopped: every flow ends.
    let mut flows = l.lock();
    for f in flows.take_all() {
        l.remove_flow(&mut flows, &f, CloseReason::Shutdown);
    }
}

/// Datagrams from the other process. Of an `Ask`, the runs of datagrams that are surely this
/// process's are served here, in order, and the others sent back as they came; `Returned`
/// ones are handled here after all.
#[allow(clippy::too_many_arguments)]
async fn across(
    edge: &Arc<Edge>,
    l: &Arc<QuicListener>,
    relay: &mut Option<Relay>,
    kind: relayed::Kind,
    client: SocketAddr,
    data: &[u8],
    stride: usize,
    ecn: Option<EcnCodepoint>,
) {
    let relayed::Kind::Ask { asker_has_address } = kind else {
        l.m.handover_returned.inc_by(count(data, stride));
        // Nothing crosses twice.
        return from_client(edge, l, client, data, stride, ecn, &mut None).await;
    };
    // Runs of consecutive datagrams with the same answer, in order.
    let mut at = 0;
    while at < data.len() {
        let ours = |seg: &[u8]| l.lock().knows(client, seg, !asker_has_address);
        let first = ours(&data[at..(at + stride).min(data.len())]);
        let mut end = (at + stride).min(data.len());
        while end < data.len() && ours(&data[end..(end + stride).min(data.len())]) == first {
            end = (end + stride).min(data.len());
        }
        let run = &data[at..end];
        at = end;
        if first {
            l.m.handover_received.inc_by(count(run, stride));
        } else {
            let sent = relay
                .as_mut()
                .map(|r| r.send(relayed::Kind::Returned, client, ecn, run, stride));
            match sent {
                Some(Passed::Sent) => continue,
                Some(Passed::Full) => {
                    l.m.handover_dropped.inc_by(count(run, stride));
                    continue;
                }
                // The asker is gone: nobody else will place them.
                Some(Passed::Gone) | None => *relay = None,
            }
        }
        from_client(edge, l, client, run, stride, ecn, &mut None).await;
    }
}

/// One read from one client: datagrams of `stride` bytes, each routed on its own (they may
/// belong to different connections of one socket), consecutive ones of the same flow sent on
/// together.
///
/// `relay`: in an upgrade, the other process. A datagram of no flow this process knows by
/// connection ID (nor a hello pending here) is asked about there first: only the process
/// that has the flow may place it by address, or start a new flow with it (`None` for what
/// came across: nothing crosses twice).
async fn from_client(
    edge: &Arc<Edge>,
    l: &Arc<QuicListener>,
    peer: SocketAddr,
    data: &[u8],
    stride: usize,
    ecn: Option<EcnCodepoint>,
    relay: &mut Option<Relay>,
) {
    let now = clock_ms(Instant::now());
    // The flow of the run being gathered, and where the run starts in `data`.
    let mut run: Option<(Arc<Flow>, usize)> = None;
    // Datagrams to ask about across, gathered likewise (sent as one message).
    let mut asking: Option<usize> = None;
    let mut at = 0;
    while at < data.len() {
        let seg_start = at;
        at = (at + stride).min(data.len());
        let segment = &data[seg_start..at];
        if relay.is_some() && !l.lock().knows(peer, segment, false) {
            if let Some((f, start)) = run.take() {
                forward(l, &f, &data[start..seg_start], stride, ecn, now);
            }
            asking.get_or_insert(seg_start);
            continue;
        }
        if let Some(start) = asking.take() {
            ask(edge, l, relay, peer, ecn, &data[start..seg_start], stride).await;
        }
        let found = l.lock().find(peer, segment);
        match found {
            Found::Flow { flow, moved } => {
                if moved {
                    l.m.migrations.inc();
                    tracing::debug!(to = %peer, "QUIC flow followed to a new address");
                }
                match &run {
                    Some((current, _)) if Arc::ptr_eq(current, &flow) => {}
                    _ => {
                        if let Some((f, start)) = run.take() {
                            forward(l, &f, &data[start..seg_start], stride, ecn, now);
                        }
                        run = Some((flow, seg_start));
                    }
                }
            }
            Found::None => {
                if let Some((f, start)) = run.take() {
                    forward(l, &f, &data[start..seg_start], stride, ecn, now);
                }
                new_datagram(edge, l, peer, segment).await;
            }
        }
    }
    if let Some((f, start)) = run {
        forward(l, &f, &data[start..], stride, ecn, now);
    }
    if let Some(start) = asking {
        ask(edge, l, relay, peer, ecn, &data[start..], stride).await;
    }
}

/// Ask the other process about `data` (datagrams of `stride` bytes from `peer`). If it is
/// gone, `relay` is cleared and they are handled here after all.
async fn ask(
    edge: &Arc<Edge>,
    l: &Arc<QuicListener>,
    relay: &mut Option<Relay>,
    peer: SocketAddr,
    ecn: Option<EcnCodepoint>,
    data: &[u8],
    stride: usize,
) {
    let kind = relayed::Kind::Ask {
        asker_has_address: l.lock().has_client(peer),
    };
    match relay
        .as_mut()
        .map(|r| r.send(kind, peer, ecn, data, stride))
    {
        Some(Passed::Sent) => l.m.handover_sent.inc_by(count(data, stride)),
        Some(Passed::Full) => l.m.handover_dropped.inc_by(count(data, stride)),
        Some(Passed::Gone) | None => {
            *relay = None;
            Box::pin(from_client(edge, l, peer, data, stride, ecn, &mut None)).await;
        }
    }
}

/// A datagram from an address with no flow: an Initial starts (or continues) a pending flow;
/// once its hello is complete, the flow is established.
async fn new_datagram(edge: &Arc<Edge>, l: &Arc<QuicListener>, peer: SocketAddr, data: &[u8]) {
    if !l.config.load().acl.permits(peer.ip()) {
        edge.metrics
            .access_denied
            .with_label_values(&["listener", &l.name()])
            .inc();
        return l.initial(edge, "denied");
    }
    match admit(l, peer, data, edge.accepting_new()) {
        Ok(Some((pending, hello))) => establish(edge, l, peer, pending, hello).await,
        Ok(None) => {}
        Err(reason) => l.initial(edge, reason),
    }
}

/// The synchronous part of `new_datagram` (the flow table's lock is never held across an
/// await): `Some` when a hello is complete.
fn admit(
    l: &QuicListener,
    peer: SocketAddr,
    data: &[u8],
    accepting: bool,
) -> Result<Option<(Pending, sluice_core::hello::ClientHello)>, &'static str> {
    let cfg = l.config.load();
    let limits = Limits {
        max_flows: cfg.quic.max_flows,
        max_pending: cfg.quic.max_pending,
        max_hello_size: cfg.max_hello_size,
    };
    l.lock().admit(
        peer,
        data,
        l.is_accepting() && accepting,
        limits,
        clock_ms(Instant::now()),
    )
}
