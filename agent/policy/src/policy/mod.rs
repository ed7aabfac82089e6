//! Policy files: parse, validate, report `file:line:col: message`.
//!
//! The YAML is first read into a generic tree whose every node carries its
//! position ([`yaml`]), then checked field by field ([`check`]). Going
//! through a tree instead of `#[derive(Deserialize)]` structs lets us report
//! every problem in one run (serde stops at the first unknown key or wrong
//! type) and point each message at the node that caused it.

mod check;
mod country;
mod glob;
mod summary;
#[cfg(test)]
mod tests;
mod yaml;

pub mod model;

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use model::*;
pub use summary::summary;
use yaml::Pos;

/// One problem in a policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem concerns the whole file (e.g. unreadable).
    pub line: usize,
    /// 1-based, in characters; 0 together with `line`.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            let (file, line, col) = (self.file.display(), self.line, self.col);
            write!(f, "{file}:{line}:{col}: {}", self.message)
        }
    }
}

/// Every problem found in a policy file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Reads, parses and validates; on failure returns every problem found.
pub fn load(path: &Path) -> Result<Policy, Diagnostics> {
    let bytes = std::fs::read(path).map_err(|e| {
        let message = format!("cannot read policy: {e}");
        diagnostics(path, vec![(Pos { line: 0, col: 0 }, message)])
    })?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        let pos = position_after(&bytes[..e.valid_up_to()]);
        let message = "the file is not valid UTF-8".to_owned();
        diagnostics(path, vec![(pos, message)])
    })?;
    parse_str(path, text)
}

/// Same from text (file name used in messages).
pub fn parse_str(file: &Path, text: &str) -> Result<Policy, Diagnostics> {
    let root = yaml::parse(text).map_err(|problem| diagnostics(file, vec![problem]))?;
    // The text is the file's bytes unchanged, so this is the file's hash.
    let sha256 = Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    check::policy(&root, file, sha256).map_err(|problems| diagnostics(file, problems))
}

fn diagnostics(file: &Path, problems: Vec<(Pos, String)>) -> Diagnostics {
    let mut list: Vec<Diagnostic> = problems
        .into_iter()
        .map(|(pos, message)| Diagnostic {
            file: file.to_owned(),
            line: pos.line,
            col: pos.col,
            message,
        })
        .collect();
    // Checks run by topic (fields, then overlaps, then limits); the reader
    // wants them in file order. The sort is stable, so messages at one
    // position keep the order they were found in.
    list.sort_by_key(|d| (d.line, d.col));
    Diagnostics(list)
}

/// The position just after `valid`, a UTF-8 prefix of the file.
fn position_after(valid: &[u8]) -> Pos {
    let text = std::str::from_utf8(valid).unwrap_or_default();
    let line_start = text.rfind('\n').map_or(0, |i| i + 1);
    Pos {
        line: text.matches('\n').count() + 1,
        col: text[line_start..].chars().count() + 1,
    }
}

/// Hex SHA-256 of a file, as [`Policy::sha256`] records it.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest as _;
    let bytes = std::fs::read(path)?;
    Ok(sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// `tcp/443` or `udp/8000-8100`, as in a bridge's `ports`.
pub fn parse_port_range(text: &str) -> Result<PortRange, String> {
    check::parse_ports(text)
}
