//! QUIC as far as a passthrough router needs it: the packets (`packet`), the flow table
//! (`flows`), and the datagrams two processes pass each other in an upgrade (`handover`).

pub mod flows;
pub mod handover;
pub mod packet;
