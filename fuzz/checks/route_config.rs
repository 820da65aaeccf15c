// Any text into the config parser: errors, never panics.

pub fn check(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice::config::Config::parse(std::path::Path::new("fuzz.toml"), text);
    }
}
