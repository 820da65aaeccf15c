//! Agents as the edge knows them: the heartbeat table (`table`), the credentials that may feed
//! it (`auth`), which agent a connection goes to (`affinity`), and the names they use.

pub mod affinity;
pub mod auth;
pub mod heartbeat;
pub mod rollout;
pub mod store;
pub mod table;
pub mod versions;

use std::net::SocketAddr;

/// The ALPN protocol agents offer to reach the heartbeat API through the main port.
pub const ALPN: &str = "sluice-heartbeat";

/// What the table needs of the object it dials an agent through: its address. The binary's
/// `Backend` (with its connection count and stop token) is one.
pub trait Endpoint: Send + Sync {
    fn address(&self) -> SocketAddr;
    /// Connections open through it now (`pick = "p2c"` prefers the less loaded).
    fn active(&self) -> u64;
}

/// A resource name is matched against the lowercased SNI: lowercase host-name characters only.
pub fn resource_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Agent ids travel in URL paths (`DELETE /v1/agents/{id}`): no character needs escaping.
pub fn agent_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}
