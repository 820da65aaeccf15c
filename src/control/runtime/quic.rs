//! The runtime's QUIC listeners: their sockets and flows across reloads, and their part in a
//! binary upgrade (the UDP sockets and socket pair ends handed over, the hand-over itself).

use std::collections::HashMap;
use std::sync::Arc;

use super::{same_listener, Runtime};
use crate::config::ListenerConfig;
use crate::edge::listener;

impl Runtime {
    /// QUIC flows open on the running QUIC listeners.
    pub fn quic_flow_count(&self) -> usize {
        self.quic_listeners().iter().map(|q| q.flow_count()).sum()
    }

    /// The running QUIC listeners.
    pub fn quic_listeners(&self) -> Vec<Arc<crate::quic::QuicListener>> {
        self.quic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Listening sockets handed over by systemd or a previous sluice, by listener name.
    pub fn inherit_udp(&self, sockets: HashMap<String, std::net::UdpSocket>) {
        self.inherited_udp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(sockets);
    }

    /// Upgrade: the socket pair ends toward the old process, by QUIC listener name.
    pub fn inherit_relays(&self, relays: HashMap<String, std::os::unix::net::UnixDatagram>) {
        self.inherited_relays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(relays);
    }

    /// For an upgrade handover: a duplicate of each QUIC listener's socket taking new flows,
    /// by name, and for each a socket pair's end under `handover::RELAY` + name, whose other
    /// end that listener keeps (datagrams of flows the other process has cross over it).
    pub fn quic_fds(&self) -> Vec<(String, std::os::fd::OwnedFd)> {
        use std::os::fd::AsFd;
        let mut v = Vec::new();
        for q in self.quic_listeners().iter().filter(|q| q.is_accepting()) {
            let name = q.name();
            // SOCK_SEQPACKET: message boundaries, and an end of file when the other process
            // is gone (a datagram pair has none).
            let pair = socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)
                .map(|(ours, theirs)| {
                    for s in [&ours, &theirs] {
                        // Room for a burst of datagrams while the other side is busy.
                        let _ = s.set_send_buffer_size(4 << 20);
                        let _ = s.set_recv_buffer_size(4 << 20);
                    }
                    let unix = |s: socket2::Socket| {
                        std::os::unix::net::UnixDatagram::from(std::os::fd::OwnedFd::from(s))
                    };
                    (unix(ours), unix(theirs))
                });
            match (q.socket.as_fd().try_clone_to_owned(), pair) {
                (Ok(fd), Ok((ours, theirs))) => {
                    q.set_relay(ours);
                    v.push((name.clone(), fd));
                    v.push((
                        format!("{}{name}", crate::control::handover::RELAY),
                        theirs.into(),
                    ));
                }
                (Err(e), _) | (_, Err(e)) => tracing::error!(listener = %name, error = %e,
                    "upgrade: cannot hand this QUIC socket over; the new process binds its own"),
            }
        }
        v
    }

    /// Upgrade: the new process is ready. QUIC listeners stop reading their sockets and
    /// serve their flows with what the new process passes on.
    pub fn hand_over_quic(&self) {
        for q in self.quic_listeners() {
            q.hand_over();
        }
    }

    /// Make the running QUIC listeners match `cfgs`, with the sockets bound for new ones.
    /// A listener whose address is unchanged keeps its socket and its flows (its settings
    /// are updated); one removed or moved stops taking new flows and ends when its flows
    /// have gone idle.
    pub(super) fn sync_quic(
        self: &Arc<Self>,
        cfgs: &[ListenerConfig],
        fresh: Vec<(ListenerConfig, tokio::net::UdpSocket)>,
        added: &mut Vec<String>,
        removed: &mut Vec<String>,
        updated: &mut Vec<String>,
    ) {
        let mut quic = self.quic.lock().unwrap_or_else(|e| e.into_inner());
        let was: Vec<String> = quic.iter().map(|q| q.name()).collect();
        let mut next = Vec::new();
        for q in quic.drain(..) {
            let keep = q.is_accepting()
                && cfgs.iter().any(|c| {
                    c.name == q.name()
                        && listener::addresses_agree(c.address, q.local_addr)
                        && !fresh.iter().any(|(f, _)| f.name == c.name)
                });
            match cfgs.iter().find(|c| c.name == q.name()) {
                Some(c) if keep => {
                    let old = q.config.load();
                    if !same_listener(&old, c) || old.quic != c.quic {
                        q.config.store(Arc::new(c.clone()));
                        updated.push(c.name.clone());
                    }
                    next.push(q);
                }
                found => {
                    if found.is_none() {
                        removed.push(q.name());
                    }
                    // Moved: the new socket serves new flows, this one its own until idle.
                    q.close();
                    // Still serving its flows until they are idle; not listed.
                }
            }
        }
        for (cfg, sock) in fresh {
            let name = cfg.name.clone();
            let relay = self
                .inherited_relays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            match crate::quic::QuicListener::start(&self.edge, cfg, sock, relay) {
                Ok(q) => {
                    if was.contains(&name) {
                        updated.push(name);
                    } else {
                        added.push(name);
                    }
                    next.push(q);
                }
                Err(e) => {
                    tracing::error!(listener = %name, error = %e, "cannot start QUIC listener")
                }
            }
        }
        *quic = next;
    }
}
