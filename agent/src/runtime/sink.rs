//! The JSON-lines events log (and stdout), with size-based rotation:
//! `events.jsonl` → `events.jsonl.1` → … → `events.jsonl.<keep>`, the
//! oldest dropped, so the log stays bounded at about `(keep + 1) × max`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    /// Rotate when the file reaches this many bytes; 0 = never.
    pub max_bytes: u64,
    /// Rotated files kept beside the live one.
    pub keep: u32,
}

pub struct Sink {
    stdout: bool,
    file: Option<(PathBuf, File, u64)>,
    rotation: Rotation,
}

fn open_append(p: &Path) -> Result<(File, u64)> {
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .with_context(|| format!("opening events log {}", p.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, len))
}

fn numbered(p: &Path, n: u32) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

impl Sink {
    pub fn open(stdout: bool, path: Option<&Path>, rotation: Rotation) -> Result<Sink> {
        let file = match path {
            Some(p) => {
                let (f, len) = open_append(p)?;
                Some((p.to_path_buf(), f, len))
            }
            None => None,
        };
        Ok(Sink {
            stdout,
            file,
            rotation,
        })
    }

    /// Writes whole lines; errors are reported, never fatal to enforcement.
    /// A batch is split at line ends so no file grows past the limit by more
    /// than one line.
    pub fn write(&mut self, lines: &str) {
        if self.stdout {
            let mut out = io::stdout().lock();
            let _ = out.write_all(lines.as_bytes());
            let _ = out.flush();
        }
        let mut rest = lines;
        while !rest.is_empty() {
            let Some((path, f, len)) = &mut self.file else {
                return;
            };
            let room = if self.rotation.max_bytes == 0 {
                usize::MAX
            } else {
                self.rotation.max_bytes.saturating_sub(*len) as usize
            };
            // Take whole lines that fit (at least one, so progress is certain).
            let mut cut = 0;
            for (i, b) in rest.bytes().enumerate() {
                if b == b'\n' {
                    if i + 1 > room && cut > 0 {
                        break;
                    }
                    cut = i + 1;
                    if cut >= room {
                        break;
                    }
                }
            }
            if cut == 0 {
                cut = rest.len();
            }
            let (chunk, tail) = rest.split_at(cut);
            rest = tail;
            if let Err(e) = f.write_all(chunk.as_bytes()) {
                tracing::warn!("writing the events log {} failed: {e}", path.display());
                return;
            }
            *len += chunk.len() as u64;
            if self.rotation.max_bytes > 0 && *len >= self.rotation.max_bytes {
                let path = path.clone();
                if let Err(e) = self.rotate(&path) {
                    tracing::warn!("rotating the events log failed: {e:#}");
                    return;
                }
            }
        }
    }

    fn rotate(&mut self, path: &Path) -> Result<()> {
        let keep = self.rotation.keep;
        if keep == 0 {
            fs::remove_file(path).ok();
        } else {
            let _ = fs::remove_file(numbered(path, keep));
            for n in (1..keep).rev() {
                let _ = fs::rename(numbered(path, n), numbered(path, n + 1));
            }
            fs::rename(path, numbered(path, 1))
                .with_context(|| format!("renaming {}", path.display()))?;
        }
        let (f, len) = open_append(path)?;
        self.file = Some((path.to_path_buf(), f, len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_the_log_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut s = Sink::open(
            false,
            Some(&p),
            Rotation {
                max_bytes: 1000,
                keep: 2,
            },
        )
        .unwrap();
        let line = format!("{}\n", "x".repeat(99));
        for _ in 0..10 {
            s.write(&line.repeat(10));
        }
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3000, "{total}");
        assert!(numbered(&p, 2).exists());
        assert!(!numbered(&p, 3).exists());
    }
}
