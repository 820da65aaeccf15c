// Any text into the config parser: errors, never panics. The core's validation is pure (host
// names, tokens and certificates come out as pending work), so fuzzing it does no I/O.

pub fn check(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let files = [(std::path::PathBuf::from("fuzz.toml"), text.to_owned())];
        match sluice_core::config::Config::validate_files(&files) {
            Ok(v) => {
                for e in &v.errors {
                    let _ = e.to_string();
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
}
