//! Config errors and where they point: the key path of a value (`route[1].pool`), the line
//! it is on (from toml_edit's spans), and the file it came from when conf.d files are merged.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, "{line}:")?;
        }
        write!(f, " {}: {} — {}", self.key, self.problem, self.fix)
    }
}

/// All problems found in a config; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl std::error::Error for ConfigErrors {}

/// A key path like `route[1].pool` or `pool.tunnel.backends[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyPath(pub(super) Vec<Seg>);

impl KeyPath {
    pub(super) fn key(&self, k: &str) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_owned()));
        KeyPath(v)
    }
    pub(super) fn index(&self, i: usize) -> KeyPath {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        KeyPath(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Finds the line of a key path in the source text, using toml_edit's spans.
pub(super) struct Locator<'a> {
    src: &'a str,
    pub(super) doc: Option<toml_edit::Document<&'a str>>,
}

impl<'a> Locator<'a> {
    pub(super) fn new(src: &'a str) -> Self {
        // toml_edit panics on some malformed inputs (found by fuzz/route_config: an `expect`
        // in its parser). Line numbers are a courtesy; a config error must never crash a
        // running edge, so a panic here only means "no line numbers".
        let doc = std::panic::catch_unwind(|| toml_edit::Document::parse(src).ok())
            .ok()
            .flatten();
        Self { src, doc }
    }

    /// A locator that only maps offsets to lines (no document parse).
    pub(super) fn lines_only(src: &'a str) -> Self {
        Self { src, doc: None }
    }

    pub(super) fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.src.len());
        self.src.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    /// The line of the deepest part of `path` that exists in the document.
    pub(super) fn line(&self, path: &KeyPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best: Option<std::ops::Range<usize>> = None;
        for seg in &path.0 {
            let Some((next, span)) = node.child(seg) else {
                break;
            };
            if span.is_some() {
                best = span;
            }
            node = next;
        }
        best.map(|s| self.line_of_offset(s.start))
    }
}

/// A position in a toml_edit tree: tables of arrays (`[[route]]`) are `Table`s, inline values
/// are `Value`s.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d toml_edit::Item),
    Table(&'d toml_edit::Table),
    Value(&'d toml_edit::Value),
}

type Span = Option<std::ops::Range<usize>>;

impl<'d> Node<'d> {
    /// The child at `seg` and the span that best points at it (its key if it has one).
    fn child(self, seg: &Seg) -> Option<(Node<'d>, Span)> {
        use toml_edit::{Item, Value};
        match (self, seg) {
            (Node::Item(Item::Table(t)), Seg::Key(_)) => Node::Table(t).child(seg),
            (Node::Item(Item::Value(v)), _) => Node::Value(v).child(seg),
            (Node::Item(Item::ArrayOfTables(a)), Seg::Index(i)) => {
                let t = a.get(*i)?;
                Some((Node::Table(t), t.span()))
            }
            (Node::Table(t), Seg::Key(k)) => {
                let item = t.get(k)?;
                let span = t.key(k).and_then(|k| k.span()).or_else(|| item.span());
                Some((Node::Item(item), span))
            }
            (Node::Value(Value::InlineTable(t)), Seg::Key(k)) => {
                let v = t.get(k)?;
                let span = t.key(k).and_then(|k| k.span()).or_else(|| v.span());
                Some((Node::Value(v), span))
            }
            (Node::Value(Value::Array(a)), Seg::Index(i)) => {
                let v = a.get(*i)?;
                Some((Node::Value(v), v.span()))
            }
            _ => None,
        }
    }
}

/// Where each merged `[[listener]]`, `[[route]]` and `[pool.*]` came from: (file, index there).
#[derive(Default)]
pub(super) struct Origins {
    pub(super) listeners: Vec<(usize, usize)>,
    pub(super) routes: Vec<(usize, usize)>,
    pub(super) agents: Vec<(usize, usize)>,
    pub(super) pools: BTreeMap<String, usize>,
}

impl Origins {
    /// The file a merged key path lives in, and the path as that file spells it.
    pub(super) fn locate(&self, at: &KeyPath) -> (usize, KeyPath) {
        let mut local = at.clone();
        let file = match at.0.as_slice() {
            [Seg::Key(k), Seg::Index(i), ..] if k == "listener" || k == "route" || k == "agent" => {
                let table = match k.as_str() {
                    "listener" => &self.listeners,
                    "route" => &self.routes,
                    _ => &self.agents,
                };
                match table.get(*i) {
                    Some(&(file, j)) => {
                        local.0[1] = Seg::Index(j);
                        file
                    }
                    None => 0,
                }
            }
            [Seg::Key(k), Seg::Key(name), ..] if k == "pool" => {
                self.pools.get(name).copied().unwrap_or(0)
            }
            _ => 0,
        };
        (file, local)
    }
}

/// Where a value is: the file, its line there and its key path, as a `ConfigError` names
/// them. Pending work carries one, so that whoever does the work reports a failure at the
/// value that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: String,
}

impl Place {
    /// The error `path:line: key: problem — fix` at this place.
    pub fn error(&self, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
        ConfigError {
            path: self.path.clone(),
            line: self.line,
            key: self.key.clone(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}
