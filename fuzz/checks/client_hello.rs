// Any bytes into the ClientHello parser: it must never panic, and a hello it accepts must
// parse the same way when its handshake is re-framed into smaller records. Shared by the
// fuzz target and the corpus replay in tests/fuzz_corpora.rs.

use sluice_core::hello::{build, parse, Parse};

pub fn check(data: &[u8]) {
    if let Parse::Hello { hello, consumed } = parse(data) {
        // Re-frame the handshake bytes that were consumed and parse again.
        let mut hs = Vec::new();
        let mut pos = 0;
        while pos + 5 <= consumed {
            let len = u16::from_be_bytes([data[pos + 3], data[pos + 4]]) as usize;
            hs.extend_from_slice(&data[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        let again = build::records(&hs, 7);
        match parse(&again) {
            Parse::Hello { hello: h2, .. } => assert_eq!(hello, h2),
            other => panic!("re-framed hello parsed differently: {other:?}"),
        }
    }
    // Every prefix of valid-looking input is handled without panicking.
    for cut in [1usize, 5, 9] {
        if data.len() > cut {
            let _ = parse(&data[..data.len() - cut]);
        }
    }
}
