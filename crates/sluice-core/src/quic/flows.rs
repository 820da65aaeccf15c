//! The QUIC flow table of a passthrough listener: which flow a client datagram belongs to,
//! admitting new flows from their Initial packets, and expiry.
//!
//! Owns: the maps from client address and from connection ID to flow (so a flow is followed
//! through migration and NAT rebinding), the pending flows whose hello is incomplete (bounded
//! in number, datagrams and bytes), and the rules for when a flow or a pending one is
//! forgotten. Sans-IO: the caller passes each datagram, the time (ms on its clock) and the
//! limits, and owns the sockets; a flow is any `F: Flow` (the binary's holds its backend
//! socket). Callers hold the table behind one lock, never across an await.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::packet::{self, CryptoStream, Header, LongType};
use crate::hello::{ClientHello, Parse};

/// Datagrams and bytes a pending flow may hold while its hello is incomplete.
pub const PENDING_DATAGRAMS: usize = 16;
pub const PENDING_BYTES: usize = 64 * 1024;
/// Connection IDs remembered per flow (the server may issue several).
pub const CIDS_PER_FLOW: usize = 16;

/// What the table keeps of every flow.
#[derive(Debug)]
pub struct FlowState {
    id: u64,
    client: Mutex<SocketAddr>,
    cids: Mutex<Vec<Vec<u8>>>,
    last_seen_ms: AtomicU64,
}

impl FlowState {
    /// A new flow's state: its id (`FlowTable::next_id`), its client, the DCID of its first
    /// Initial (the client addresses its packets to it until the server answers), the time.
    pub fn new(id: u64, client: SocketAddr, dcid: &[u8], now_ms: u64) -> FlowState {
        FlowState {
            id,
            client: Mutex::new(client),
            cids: Mutex::new(vec![dcid.to_vec()]),
            last_seen_ms: AtomicU64::new(now_ms),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Where the client is now.
    pub fn client(&self) -> SocketAddr {
        *self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A datagram went either way at `now_ms`.
    pub fn seen(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    fn idle_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed))
    }

    fn cids(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.cids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A flow as the table knows it.
pub trait Flow {
    fn state(&self) -> &FlowState;
    /// The client moved to `peer` (migration, rebinding); the table has updated its state.
    fn moved(&self, _peer: SocketAddr) {}
}

/// A client whose hello is not complete yet.
pub struct Pending {
    pub version: u32,
    /// The destination connection ID of its first Initial.
    pub dcid: Vec<u8>,
    keys: rustls::quic::Keys,
    crypto: CryptoStream,
    /// Everything it sent meanwhile, replayed to the backend once the flow is routed.
    pub datagrams: Vec<Vec<u8>>,
    bytes: usize,
    started_ms: u64,
}

/// The listener's limits, as configured now.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_flows: usize,
    pub max_pending: usize,
    pub max_hello_size: usize,
}

/// Where a datagram from a client goes.
pub enum Found<F> {
    /// An established flow. `moved`: it came from a new address (counted as a migration).
    Flow { flow: Arc<F>, moved: bool },
    /// No flow: an Initial (or a pending client's 0-RTT/Handshake packet) for `admit`.
    None,
}

/// The flows of one QUIC listener.
pub struct FlowTable<F> {
    /// Every flow, by id.
    all: HashMap<u64, Arc<F>>,
    next_id: u64,
    /// The newest flow of each client address.
    by_client: HashMap<SocketAddr, Arc<F>>,
    by_cid: HashMap<Vec<u8>, Arc<F>>,
    /// Lengths of the server connection IDs seen (a short header does not say its length).
    cid_lens: BTreeSet<usize>,
    /// By client address and the DCID of its first Initial: one address may open several
    /// connections (one UDP socket, many connections, as quinn's endpoints do).
    pending: HashMap<(SocketAddr, Vec<u8>), Pending>,
}

impl<F> Default for FlowTable<F> {
    fn default() -> Self {
        FlowTable {
            all: HashMap::new(),
            next_id: 0,
            by_client: HashMap::new(),
            by_cid: HashMap::new(),
            cid_lens: BTreeSet::new(),
            pending: HashMap::new(),
        }
    }
}

impl<F: Flow> FlowTable<F> {
    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// The flow with this id.
    pub fn get(&self, id: u64) -> Option<Arc<F>> {
        self.all.get(&id).cloned()
    }

    /// An id for a new flow.
    pub fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The flow a client datagram belongs to: by its destination connection ID first (a
    /// client may run several connections from one socket, and may move), then by its source
    /// address (a short header with an ID not learned yet), then as a port rebinding. A new
    /// Initial from a known address is a new connection: `Found::None`.
    pub fn find(&mut self, peer: SocketAddr, data: &[u8]) -> Found<F> {
        if let Some(flow) = self.by_cid(data) {
            let moved = flow.state().client() != peer;
            if moved {
                // A known connection from a new address: migration or NAT rebinding. (Only
                // someone on the path can know a connection ID.)
                self.follow(&flow, peer);
            }
            return Found::Flow { flow, moved };
        }
        if let Ok(Header::Long(long)) = packet::parse_header(data) {
            // A new connection's Initial, or its 0-RTT/Handshake packets while its hello waits.
            if long.kind == Some(LongType::Initial)
                || self.pending.contains_key(&(peer, long.dcid.to_vec()))
            {
                return Found::None;
            }
        }
        if let Some(flow) = self.by_client.get(&peer).cloned() {
            self.learn_client_cid(&flow, data);
            return Found::Flow { flow, moved: false };
        }
        match self.port_rebinding(peer, data) {
            Some(flow) => Found::Flow { flow, moved: true },
            None => Found::None,
        }
    }

    /// In a binary upgrade (two processes, one socket, each with flows of its own), whether a
    /// datagram is surely this process's: one of its flows' connection IDs, or a pending
    /// hello's address and ID. `by_address`: also a short header from one of its flows'
    /// client addresses (the other process read it and has no flow with that ID). No guess
    /// (port rebinding) and no change: the caller then handles it with `find`.
    pub fn knows(&self, peer: SocketAddr, data: &[u8], by_address: bool) -> bool {
        if self.by_cid(data).is_some() {
            return true;
        }
        match packet::parse_header(data) {
            Ok(Header::Long(long)) => self.pending.contains_key(&(peer, long.dcid.to_vec())),
            Ok(Header::Short) => by_address && self.by_client.contains_key(&peer),
            _ => false,
        }
    }

    /// Whether a flow's client is at `peer`.
    pub fn has_client(&self, peer: SocketAddr) -> bool {
        self.by_client.contains_key(&peer)
    }

    /// Forget every pending hello (an upgrade's old process, once it takes no new flows: the
    /// clients' retransmissions then go to the new process whole); how many there were.
    pub fn drop_pending(&mut self) -> usize {
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    /// The flow a datagram belongs to by its destination connection ID.
    fn by_cid(&self, data: &[u8]) -> Option<Arc<F>> {
        match packet::parse_header(data).ok()? {
            Header::Long(l) => self.by_cid.get(l.dcid).cloned(),
            Header::Short => self
                .cid_lens
                .iter()
                .find_map(|&n| self.by_cid.get(data.get(1..1 + n)?).cloned()),
            Header::VersionNegotiation { .. } => None,
        }
    }

    /// `flow`'s client is at `peer` now.
    fn follow(&mut self, flow: &Arc<F>, peer: SocketAddr) {
        let old = flow.state().client();
        if self
            .by_client
            .get(&old)
            .is_some_and(|x| Arc::ptr_eq(x, flow))
        {
            self.by_client.remove(&old);
        }
        self.by_client.insert(peer, flow.clone());
        *flow
            .state()
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = peer;
        flow.moved(peer);
    }

    /// A short header from a new port of an address with exactly one flow, with a connection
    /// ID not seen: the same client after a NAT (or socket) rebinding that also switched to a
    /// fresh connection ID, as RFC 9000 §9.5 asks of a migrating endpoint. The IDs the server
    /// issued later travel encrypted, so this is the one way to follow such a move without
    /// the server's help. With two flows from that address it is ambiguous and not followed.
    fn port_rebinding(&mut self, peer: SocketAddr, data: &[u8]) -> Option<Arc<F>> {
        if data.first().is_none_or(|b| b & 0xc0 != 0x40) {
            return None;
        }
        let mut same_ip = self
            .all
            .values()
            .filter(|f| f.state().client().ip() == peer.ip());
        let flow = same_ip.next()?.clone();
        if same_ip.next().is_some() {
            return None;
        }
        self.follow(&flow, peer);
        Some(flow)
    }

    /// A client's short header on its known path may carry a connection ID the server issued
    /// later (NEW_CONNECTION_ID is encrypted): remember it, so a move to a new address that
    /// uses it is still followed. Called when no known ID was in the datagram.
    fn learn_client_cid(&mut self, flow: &Arc<F>, data: &[u8]) {
        if data.first().is_none_or(|b| b & 0x80 != 0) {
            return;
        }
        // Only with one known length is the ID's extent certain.
        if self.cid_lens.len() != 1 {
            return;
        }
        let n = self.cid_lens.first().copied().unwrap_or(0);
        if let Some(cid) = data.get(1..1 + n) {
            self.remember_cid(flow, cid);
        }
    }

    /// Map `cid` to `flow`, at most `CIDS_PER_FLOW` per flow; an ID already known stays with
    /// its flow. Returns whether it was added.
    fn remember_cid(&mut self, flow: &Arc<F>, cid: &[u8]) -> bool {
        if self.by_cid.contains_key(cid) {
            return false;
        }
        let mut cids = flow.state().cids();
        if cids.len() >= CIDS_PER_FLOW {
            return false;
        }
        cids.push(cid.to_vec());
        self.by_cid.insert(cid.to_vec(), flow.clone());
        true
    }

    /// A datagram from `flow`'s backend: a server long header carries the connection ID the
    /// client will address it by.
    pub fn from_server(&mut self, flow: &Arc<F>, data: &[u8]) {
        if let Ok(Header::Long(long)) = packet::parse_header(data) {
            if !long.scid.is_empty() && self.remember_cid(flow, long.scid) {
                self.cid_lens.insert(long.scid.len());
            }
        }
    }

    /// A datagram from an address with no flow: an Initial starts (or continues) a pending
    /// flow. `Ok(Some)` once its hello is complete (the caller routes it and `insert`s the
    /// flow); `Err(result)`: refused, with the label of `sluice_quic_initials_total`.
    /// `accepting`: the listener takes new flows.
    pub fn admit(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        accepting: bool,
        limits: Limits,
        now_ms: u64,
    ) -> Result<Option<(Pending, ClientHello)>, &'static str> {
        let long = match packet::parse_header(data).map_err(|_| "malformed")? {
            Header::Long(long) => long,
            Header::Short => return Err("unknown_flow"),
            Header::VersionNegotiation { .. } => return Err("not_initial"),
        };
        let key = (peer, long.dcid.to_vec());
        if long.kind != Some(LongType::Initial) {
            // 0-RTT or Handshake packets of a client whose hello is incomplete wait with it.
            let Some(p) = self.pending.get_mut(&key) else {
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
            self.pending.remove(&key);
            return Err("pending_overflow");
        }
        if !accepting {
            return Err("draining");
        }
        if data.len() < 1200 {
            // RFC 9000 §14.1: a client pads its Initial datagrams to 1200 bytes.
            return Err("too_short");
        }
        if long.dcid.len() < 8 {
            return Err("malformed");
        }
        if self
            .pending
            .get(&key)
            .is_some_and(|p| p.version != long.version)
        {
            self.pending.remove(&key);
        }
        if !self.pending.contains_key(&key) {
            if self.pending.len() >= limits.max_pending {
                return Err("pending_full");
            }
            let keys = packet::client_initial_keys(long.version, long.dcid)
                .ok_or("unsupported_version")?;
            self.pending.insert(
                key.clone(),
                Pending {
                    version: long.version,
                    dcid: long.dcid.to_vec(),
                    keys,
                    crypto: CryptoStream::default(),
                    datagrams: Vec::new(),
                    bytes: 0,
                    started_ms: now_ms,
                },
            );
        }
        let Some(p) = self.pending.get_mut(&key) else {
            return Ok(None);
        };
        let plain = match packet::decrypt_initial(&data[..long.len], &long, &p.keys) {
            Ok(plain) => plain,
            Err(_) => {
                if p.datagrams.is_empty() {
                    self.pending.remove(&key);
                }
                return Err("decrypt_failed");
            }
        };
        let Ok(frames) = packet::crypto_frames(&plain) else {
            self.pending.remove(&key);
            return Err("malformed");
        };
        for (offset, bytes) in frames {
            if p.crypto.add(offset, bytes, limits.max_hello_size).is_err() {
                self.pending.remove(&key);
                return Err("too_large");
            }
        }
        if p.datagrams.len() >= PENDING_DATAGRAMS || p.bytes + data.len() > PENDING_BYTES {
            self.pending.remove(&key);
            return Err("pending_overflow");
        }
        p.bytes += data.len();
        p.datagrams.push(data.to_vec());
        let hello = match packet::parse_hello(&p.crypto.prefix()) {
            Parse::Incomplete { .. } => return Ok(None),
            Parse::Hello { hello, .. } => hello,
            Parse::NotTls | Parse::Malformed(_) => {
                self.pending.remove(&key);
                return Err("malformed");
            }
        };
        let Some(pending) = self.pending.remove(&key) else {
            return Ok(None);
        };
        if self.all.len() >= limits.max_flows {
            return Err("table_full");
        }
        Ok(Some((pending, hello)))
    }

    /// A routed flow joins the table. The address's newest connection answers for it when a
    /// datagram carries no known ID; an older one from the same socket goes on by its IDs.
    pub fn insert(&mut self, flow: Arc<F>) {
        let state = flow.state();
        self.all.insert(state.id, flow.clone());
        self.by_client.insert(state.client(), flow.clone());
        for cid in state.cids().iter() {
            self.by_cid.insert(cid.clone(), flow.clone());
        }
    }

    /// Forget `flow`; `false` if it was already gone.
    pub fn remove(&mut self, flow: &Arc<F>) -> bool {
        let state = flow.state();
        if self.all.remove(&state.id).is_none() {
            return false;
        }
        let client = state.client();
        if self
            .by_client
            .get(&client)
            .is_some_and(|f| Arc::ptr_eq(f, flow))
        {
            self.by_client.remove(&client);
        }
        for cid in state.cids().iter() {
            if self.by_cid.get(cid).is_some_and(|f| Arc::ptr_eq(f, flow)) {
                self.by_cid.remove(cid);
            }
        }
        true
    }

    /// Flows with no datagram either way for `idle_ms` (the caller `remove`s them), and the
    /// number of pending flows dropped for an incomplete hello after `hello_ms`.
    pub fn expire(&mut self, now_ms: u64, idle_ms: u64, hello_ms: u64) -> (Vec<Arc<F>>, usize) {
        let idle: Vec<Arc<F>> = self
            .all
            .values()
            .filter(|f| f.state().idle_ms(now_ms) >= idle_ms)
            .cloned()
            .collect();
        let before = self.pending.len();
        self.pending
            .retain(|_, p| now_ms.saturating_sub(p.started_ms) < hello_ms);
        (idle, before - self.pending.len())
    }

    /// Every flow (the listener stops); pending ones are dropped.
    pub fn take_all(&mut self) -> Vec<Arc<F>> {
        self.pending.clear();
        self.all.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::build;
    use crate::quic::packet::{build_initial, V1};

    struct TestFlow(FlowState);

    impl Flow for TestFlow {
        fn state(&self) -> &FlowState {
            &self.0
        }
    }

    const LIMITS: Limits = Limits {
        max_flows: 2,
        max_pending: 2,
        max_hello_size: 16384,
    };

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn initial(dcid: &[u8]) -> Vec<u8> {
        let hello = build::hello(Some("app.example.com"), &["h3"]);
        // The handshake message, without the record header TCP would carry.
        build_initial(V1, dcid, &[1, 2, 3, 4], 0, 0, &hello[5..])
    }

    /// Admit a client's Initial and insert its flow.
    fn open(t: &mut FlowTable<TestFlow>, peer: SocketAddr, dcid: &[u8], now: u64) -> Arc<TestFlow> {
        let (pending, hello) = t
            .admit(peer, &initial(dcid), true, LIMITS, now)
            .unwrap()
            .unwrap();
        assert_eq!(hello.sni.as_deref(), Some("app.example.com"));
        let id = t.next_id();
        let f = Arc::new(TestFlow(FlowState::new(id, peer, &pending.dcid, now)));
        t.insert(f.clone());
        f
    }

    /// A 1-RTT (short header) datagram to connection ID `cid`.
    fn short(cid: &[u8]) -> Vec<u8> {
        [&[0x40][..], cid, &[0u8; 20]].concat()
    }

    #[test]
    fn knows_claims_by_id_and_pending_hello_and_by_address_only_when_asked() {
        let mut t: FlowTable<TestFlow> = FlowTable::default();
        let f = open(&mut t, addr("192.0.2.1:1000"), &[7; 8], 0);
        t.from_server(&f, &server_long(&[9; 8]));
        // Its IDs, from any address.
        assert!(t.knows(addr("198.51.100.1:1"), &short(&[9; 8]), false));
        assert!(t.knows(addr("198.51.100.1:1"), &initial(&[7; 8]), false));
        // An unknown ID from its client's address: only when the other process asks.
        assert!(!t.knows(addr("192.0.2.1:1000"), &short(&[5; 8]), false));
        assert!(t.knows(addr("192.0.2.1:1000"), &short(&[5; 8]), true));
        // Another port of that address is a guess (port rebinding): never claimed.
        assert!(!t.knows(addr("192.0.2.1:1001"), &short(&[5; 8]), true));
        // A new connection's Initial is nobody's yet; once pending, its hello's.
        assert!(!t.knows(addr("192.0.2.2:1"), &initial(&[3; 8]), true));
        let hello = build::hello(Some("app.example.com"), &["h3"]);
        let first_half = build_initial(V1, &[3; 8], &[1, 2, 3, 4], 0, 0, &hello[5..45]);
        assert!(matches!(
            t.admit(addr("192.0.2.2:1"), &first_half, true, LIMITS, 0),
            Ok(None)
        ));
        assert!(t.knows(addr("192.0.2.2:1"), &initial(&[3; 8]), false));
        assert!(!t.knows(addr("192.0.2.3:1"), &initial(&[3; 8]), false));
        assert_eq!(t.len(), 1, "nothing was changed by asking");
    }

    /// A server's Handshake (long header) datagram with source connection ID `scid`.
    fn server_long(scid: &[u8]) -> Vec<u8> {
        let mut d = vec![0xe0];
        d.extend_from_slice(&V1.to_be_bytes());
        d.push(4);
        d.extend_from_slice(&[1, 2, 3, 4]);
        d.push(scid.len() as u8);
        d.extend_from_slice(scid);
        d.extend_from_slice(&[0x40, 0x10]);
        d.extend_from_slice(&[0u8; 16]);
        d
    }

    fn found(f: Found<TestFlow>) -> Option<(u64, bool)> {
        match f {
            Found::Flow { flow, moved } => Some((flow.state().id(), moved)),
            Found::None => None,
        }
    }

    #[test]
    fn a_flow_is_found_by_address_and_followed_by_connection_id() {
        let mut t = FlowTable::default();
        let a = addr("192.0.2.1:5000");
        let f = open(&mut t, a, &[9; 8], 0);
        // The server names its ID; the client uses it from anywhere.
        t.from_server(&f, &server_long(&[7; 8]));
        assert_eq!(found(t.find(a, &short(&[7; 8]))), Some((1, false)));
        let b = addr("198.51.100.9:6000");
        assert_eq!(found(t.find(b, &short(&[7; 8]))), Some((1, true)));
        assert_eq!(f.state().client(), b);
        // The old address no longer answers for it; a stranger's Initial is a new flow.
        assert_eq!(found(t.find(a, &short(&[1; 8]))), None);
        assert_eq!(found(t.find(b, &initial(&[5; 8]))), None);
    }

    #[test]
    fn a_rebinding_to_a_new_port_is_followed_only_when_unambiguous() {
        let mut t = FlowTable::default();
        let f = open(&mut t, addr("192.0.2.1:5000"), &[9; 8], 0);
        let moved = addr("192.0.2.1:5001");
        assert_eq!(found(t.find(moved, &short(&[3; 8]))), Some((1, true)));
        assert_eq!(f.state().client(), moved);
        // Two flows from one address: a new port is ambiguous.
        open(&mut t, addr("192.0.2.1:5002"), &[8; 8], 0);
        assert_eq!(found(t.find(addr("192.0.2.1:5003"), &short(&[3; 8]))), None);
    }

    #[test]
    fn admission_is_bounded_and_says_why() {
        let mut t: FlowTable<TestFlow> = FlowTable::default();
        let a = addr("192.0.2.1:5000");
        // Hellos that never complete hold a pending slot each, up to max_pending.
        let hello = build::hello(Some("app.example.com"), &["h3"]);
        for (i, dcid) in [[4u8; 8], [5; 8]].iter().enumerate() {
            let half = build_initial(V1, dcid, &[], 0, 0, &hello[5..40]);
            let from = SocketAddr::from(([192, 0, 2, 9], 1000 + i as u16));
            assert!(matches!(t.admit(from, &half, true, LIMITS, 0), Ok(None)));
        }
        let third = build_initial(V1, &[6; 8], &[], 0, 0, &hello[5..40]);
        assert_eq!(
            t.admit(addr("192.0.2.9:2000"), &third, true, LIMITS, 0)
                .err(),
            Some("pending_full")
        );
        t.expire(60_000, 60_000, 10_000);
        assert_eq!(
            t.admit(a, &initial(&[9; 8]), false, LIMITS, 0).err(),
            Some("draining")
        );
        assert_eq!(
            t.admit(a, &short(&[1; 8]), true, LIMITS, 0).err(),
            Some("unknown_flow")
        );
        assert_eq!(
            t.admit(a, &initial(&[9; 4]), true, LIMITS, 0).err(),
            Some("malformed")
        );
        open(&mut t, a, &[1; 8], 0);
        open(&mut t, addr("192.0.2.2:5000"), &[2; 8], 0);
        assert_eq!(
            t.admit(addr("192.0.2.3:5000"), &initial(&[3; 8]), true, LIMITS, 0)
                .err(),
            Some("table_full")
        );
    }

    #[test]
    fn idle_flows_and_stale_pending_hellos_expire() {
        let mut t = FlowTable::default();
        let f = open(&mut t, addr("192.0.2.1:5000"), &[9; 8], 0);
        let g = open(&mut t, addr("192.0.2.2:5000"), &[8; 8], 0);
        g.state().seen(25_000);
        let (idle, _) = t.expire(30_000, 30_000, 10_000);
        assert_eq!(idle.len(), 1);
        assert!(Arc::ptr_eq(&idle[0], &f));
        assert!(t.remove(&f));
        assert!(!t.remove(&f), "removed once");
        assert_eq!(t.len(), 1);
        assert_eq!(found(t.find(addr("192.0.2.1:5000"), &short(&[9; 8]))), None);
        // A pending hello (half a hello: the rest never comes) times out after hello_ms.
        let hello = build::hello(Some("app.example.com"), &["h3"]);
        let half = build_initial(V1, &[4; 8], &[], 0, 0, &hello[5..40]);
        assert!(matches!(
            t.admit(addr("192.0.2.5:1"), &half, true, LIMITS, 1_000),
            Ok(None)
        ));
        assert_eq!(t.expire(5_000, 30_000, 10_000).1, 0);
        assert_eq!(t.expire(11_000, 30_000, 10_000).1, 1);
    }
}
