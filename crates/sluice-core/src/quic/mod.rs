//! QUIC as far as a passthrough router needs it: the packets (`packet`) and the flow table
//! (`flows`).

pub mod flows;
pub mod packet;
