// Any bytes into the inbound PROXY header parser: it must never panic; a header it accepts
// never claims more bytes than it was given, and every prefix of it is `Incomplete`.

use sluice_core::proxy::{parse_inbound, Inbound};

pub fn check(data: &[u8]) {
    if let Inbound::Header { consumed, .. } = parse_inbound(data) {
        assert!(consumed <= data.len());
        for cut in 0..consumed {
            assert_eq!(
                parse_inbound(&data[..cut]),
                Inbound::Incomplete,
                "prefix {cut}"
            );
        }
    }
}
