// Any datagram into the QUIC Initial decoding sluice does before routing (header, Initial
// decryption, CRYPTO frames, reassembly, the hello parser): errors, never panics. And the
// bytes taken as CRYPTO data, sealed into a real Initial, come back out exactly.

use sluice_core::quic::packet::{
    build_initial, client_initial_keys, crypto_frames, decrypt_initial, parse_header, parse_hello,
    CryptoStream, Header, V1, V2,
};

pub fn check(data: &[u8]) {
    decode(data);
    if data.len() < 10 || data.len() > 1100 {
        return;
    }
    let version = if data[0] & 1 == 0 { V1 } else { V2 };
    let dcid = &data[1..9];
    let offset = u64::from(data[9]);
    let crypto = &data[10..];
    let packet = build_initial(version, dcid, &[1, 2, 3], 0, offset, crypto);
    let Ok(Header::Long(long)) = parse_header(&packet) else {
        panic!("a built Initial has a long header");
    };
    let keys = client_initial_keys(version, long.dcid).expect("v1 and v2 have Initial keys");
    let plain = decrypt_initial(&packet[..long.len], &long, &keys).expect("decrypts");
    let frames = crypto_frames(&plain).expect("frames");
    assert_eq!(frames[0], (offset, crypto));
}

fn decode(datagram: &[u8]) {
    let Ok(Header::Long(long)) = parse_header(datagram) else {
        return;
    };
    let Some(keys) = client_initial_keys(long.version, long.dcid) else {
        return;
    };
    let Some(packet) = datagram.get(..long.len) else {
        return;
    };
    let Ok(plain) = decrypt_initial(packet, &long, &keys) else {
        return;
    };
    let Ok(frames) = crypto_frames(&plain) else {
        return;
    };
    let mut stream = CryptoStream::default();
    for (offset, bytes) in frames {
        if stream.add(offset, bytes, 16384).is_err() {
            return;
        }
    }
    let _ = parse_hello(&stream.prefix());
}
