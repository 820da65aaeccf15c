// Any bytes into the ClientHello parser: it must never panic, a hello it accepts must parse
// the same way when its handshake is re-framed into smaller records, and feeding the bytes in
// pieces (the incremental `Reassembly`) must give the same answer as parsing them at once.
// Shared by the fuzz target and the corpus replay in tests/fuzz_corpora.rs.

use sluice_core::hello::{build, parse, Parse, Reassembly, MAX_RECORDS};

pub fn check(data: &[u8]) {
    let whole = parse(data);
    let mut r = Reassembly::default();
    for cut in [data.len() / 3, data.len() / 2, data.len()] {
        let part = r.parse(&data[..cut]);
        if cut == data.len() {
            assert_eq!(part, whole, "fed in pieces, the answer differs");
        } else if !matches!(part, Parse::Incomplete { .. }) {
            // A final answer on a prefix is the answer for the whole.
            assert_eq!(part, whole, "a prefix decided differently");
            break;
        }
    }
    if let Parse::Hello { hello, consumed } = parse(data) {
        // Re-frame the handshake bytes that were consumed and parse again.
        let mut hs = Vec::new();
        let mut pos = 0;
        while pos + 5 <= consumed {
            let len = u16::from_be_bytes([data[pos + 3], data[pos + 4]]) as usize;
            hs.extend_from_slice(&data[pos + 5..pos + 5 + len]);
            pos += 5 + len;
        }
        // Small records, but within the limit on records per hello.
        let again = build::records(&hs, 7.max(hs.len().div_ceil(MAX_RECORDS - 1)));
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
