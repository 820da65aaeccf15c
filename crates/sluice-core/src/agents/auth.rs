//! Who may announce what: bearer tokens (from a file, compared in constant time), client
//! certificates (verified against a CA by rustls), and the scope a token carries.
//!
//! Owns: the tokens file format and the scope check (the heartbeat API's TLS server config,
//! which reads files, is the binary's `agents::auth`). Never logs a token: only its name.

use serde::Serialize;
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;

/// One bearer token. Only its SHA-256 digest is kept: a token of any length compares in the
/// same time, and a memory dump does not reveal it.
#[derive(Debug, Clone, Serialize)]
pub struct Token {
    pub name: String,
    #[serde(skip)]
    pub digest: [u8; 32],
    /// Resource kinds it may announce (`None`: any).
    pub kinds: Option<Vec<String>>,
    /// Labels every resource it announces must carry.
    pub labels: BTreeMap<String, String>,
}

impl Token {
    /// Scoped tokens may only announce within their scope, and may not take over agents
    /// announced by another credential.
    pub fn scoped(&self) -> bool {
        self.kinds.is_some() || !self.labels.is_empty()
    }
}

fn digest(secret: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The token a bearer secret belongs to. Every token is compared, whatever matches, so the
/// time taken says nothing about which one (or how much of one) matched.
pub fn find_token<'a>(tokens: &'a [Token], secret: &[u8]) -> Option<&'a Token> {
    token_by_digest(tokens, &digest(secret))
}

/// The token with this digest (a credential checked again against reloaded tokens), compared
/// the same way.
pub fn token_by_digest<'a>(tokens: &'a [Token], d: &[u8; 32]) -> Option<&'a Token> {
    let mut found = None;
    for t in tokens {
        if bool::from(t.digest.ct_eq(d)) {
            found = Some(t);
        }
    }
    found
}

/// Parse a tokens file: one token per line, then optional `name=`, `kinds=a,b` and
/// `labels=k=v,k2=v2` fields; `#` starts a comment. Errors are (line, problem).
pub fn parse_tokens(text: &str) -> Result<Vec<Token>, Vec<(usize, String)>> {
    let mut tokens = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some(secret) = fields.next() else {
            continue;
        };
        if secret.len() < 16 {
            errors.push((
                line_no,
                "token shorter than 16 characters (easy to guess)".to_owned(),
            ));
            continue;
        }
        let mut token = Token {
            name: format!("token{line_no}"),
            digest: digest(secret.as_bytes()),
            kinds: None,
            labels: BTreeMap::new(),
        };
        for field in fields {
            match field.split_once('=') {
                Some(("name", v)) if !v.is_empty() => token.name = v.to_owned(),
                Some(("kinds", v)) if !v.is_empty() => {
                    token.kinds = Some(v.split(',').map(str::to_owned).collect())
                }
                Some(("labels", v)) if !v.is_empty() => {
                    for pair in v.split(',') {
                        match pair.split_once('=') {
                            Some((k, v)) if !k.is_empty() => {
                                token.labels.insert(k.to_owned(), v.to_owned());
                            }
                            _ => errors.push((line_no, format!("label `{pair}` is not key=value"))),
                        }
                    }
                }
                _ => errors.push((
                    line_no,
                    format!("unknown field `{field}` (expected name=, kinds=, labels=)"),
                )),
            }
        }
        if tokens.iter().any(|t: &Token| t.digest == token.digest) {
            errors.push((line_no, "the same token is listed twice".to_owned()));
        }
        // Agents belong to the name that announced them: two tokens with one name could
        // overwrite each other's agents, and `cert`/`config` are the other owners' names.
        if tokens.iter().any(|t: &Token| t.name == token.name)
            || token.name == "cert"
            || token.name == "config"
        {
            errors.push((
                line_no,
                format!(
                    "token name `{}` is taken (names must be unique; `cert` and `config` are reserved)",
                    token.name
                ),
            ));
        }
        tokens.push(token);
    }
    if errors.is_empty() {
        Ok(tokens)
    } else {
        Err(errors)
    }
}

/// Whether a credential with `token`'s scope may announce a resource of `kind` with
/// `labels`; `Err` says why not.
pub fn in_scope(
    token: Option<&Token>,
    kind: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let Some(t) = token else { return Ok(()) };
    if let Some(kinds) = &t.kinds {
        if !kinds.iter().any(|k| k == kind) {
            return Err(format!(
                "token `{}` may announce kinds {kinds:?}, not `{kind}`",
                t.name
            ));
        }
    }
    for (k, v) in &t.labels {
        if labels.get(k) != Some(v) {
            return Err(format!(
                "token `{}` may only announce resources labelled {k}={v}",
                t.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_with_names_and_scopes() {
        let text = "# agents\n0123456789abcdef0123 name=east kinds=app,db labels=env=prod\n\nfedcba9876543210fedc\n";
        let tokens = parse_tokens(text).unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].name, "east");
        assert!(tokens[0].scoped());
        assert_eq!(tokens[1].name, "token4");
        assert!(!tokens[1].scoped());
        assert_eq!(
            find_token(&tokens, b"fedcba9876543210fedc").map(|t| t.name.as_str()),
            Some("token4")
        );
        assert!(find_token(&tokens, b"fedcba9876543210fedX").is_none());
        assert!(find_token(&tokens, b"").is_none());
    }

    #[test]
    fn bad_token_lines_name_their_line() {
        let errs = parse_tokens("short\n0123456789abcdef0123 colour=red\n").unwrap_err();
        assert_eq!(errs[0].0, 1);
        assert_eq!(errs[1].0, 2);
        assert!(errs[1].1.contains("colour=red"));
    }

    #[test]
    fn scope_checks_kind_and_labels() {
        let t = parse_tokens("0123456789abcdef0123 kinds=app labels=env=prod\n").unwrap();
        let prod: BTreeMap<String, String> = [("env".into(), "prod".into())].into();
        assert!(in_scope(Some(&t[0]), "app", &prod).is_ok());
        assert!(in_scope(Some(&t[0]), "db", &prod).is_err());
        assert!(in_scope(Some(&t[0]), "app", &BTreeMap::new()).is_err());
        assert!(in_scope(None, "db", &BTreeMap::new()).is_ok());
    }
}
