//! The VM's initramfs: an uncompressed cpio archive (the kernel's `newc`
//! format) written here, so no `cpio` binary is needed. Dynamic host tools
//! (`ip`, `nc`, `curl`, GNU `date`) go in with the shared libraries `ldd`
//! names, at the same paths, so the guest's loader finds them.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::run_capture;

/// One archive member.
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// An initramfs being assembled: paths (without a leading `/`) to entries.
/// Parent directories are added on the way.
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    fn parents(&mut self, path: &str) {
        let mut at = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.entries.entry(at.clone()).or_insert(Entry::Dir);
        }
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    pub fn dir(&mut self, path: &str) {
        let k = Self::key(path);
        self.parents(&k);
        self.entries.entry(k).or_insert(Entry::Dir);
    }

    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let k = Self::key(path);
        self.parents(&k);
        self.entries.insert(k, Entry::File { data, mode });
    }

    /// Copies a host file (following symlinks) to `path` in the archive.
    pub fn file(&mut self, path: &str, from: &Path) -> Result<()> {
        let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        let mode = if is_executable(from) { 0o755 } else { 0o644 };
        self.bytes(path, data, mode);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let k = Self::key(path);
        self.parents(&k);
        self.entries.insert(k, Entry::Symlink(target.to_string()));
    }

    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        let k = Self::key(path);
        self.parents(&k);
        self.entries.insert(k, Entry::CharDev { major, minor });
    }

    /// Copies a dynamically linked host program to `path` together with
    /// every shared library `ldd` lists for it (each at its host path).
    pub fn program_with_libs(&mut self, path: &str, from: &Path) -> Result<()> {
        self.file(path, from)?;
        if is_static_elf(from)? {
            return Ok(());
        }
        let out = run_capture(Command::new("ldd").arg(from))?;
        for lib in ldd_paths(&out) {
            if !self.entries.contains_key(&Self::key(&lib)) {
                self.file(&lib, Path::new(&lib))?;
            }
        }
        Ok(())
    }

    /// Puts every entry of `other` below `prefix` (e.g. a root file system
    /// the guest's `/init` switches to).
    pub fn nest(&mut self, prefix: &str, other: Initramfs) {
        self.dir(prefix);
        let base = Self::key(prefix);
        for (k, e) in other.entries {
            self.entries.insert(format!("{base}/{k}"), e);
        }
    }

    /// Total bytes of file data.
    pub fn data_len(&self) -> usize {
        self.entries
            .values()
            .map(|e| match e {
                Entry::File { data, .. } => data.len(),
                _ => 0,
            })
            .sum()
    }

    /// Writes the archive (`newc`, uncompressed) to `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let mut w = std::io::BufWriter::new(
            fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
        );
        for (ino, (name, e)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match e {
                Entry::Dir => (0o040_755, &[], (0, 0)),
                Entry::File { data, mode } => (0o100_000 | mode, data, (0, 0)),
                Entry::Symlink(t) => (0o120_777, t.as_bytes(), (0, 0)),
                Entry::CharDev { major, minor } => (0o020_600, &[], (*major, *minor)),
            };
            write_member(&mut w, ino, mode, name, data, rdev)?;
        }
        write_member(&mut w, 0, 0, "TRAILER!!!", &[], (0, 0))?;
        w.flush()?;
        Ok(())
    }
}

fn write_member(
    w: &mut impl std::io::Write,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        dmaj = 0,
        dmin = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        namesize = name.len() + 1,
        check = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad4(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad4(w, data.len())?;
    Ok(())
}

fn pad4(w: &mut impl std::io::Write, len: usize) -> Result<()> {
    let pad = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// The absolute library paths in `ldd` output (`name => /path (addr)` and
/// the loader's `/path (addr)` line); the vDSO has no path and is skipped.
pub fn ldd_paths(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect()
}

/// Whether `p` is an ELF executable without a program interpreter
/// (`PT_INTERP`): statically linked, static-pie included. Fails when `p`
/// is not a 64-bit little-endian ELF file.
pub fn is_static_elf(p: &Path) -> Result<bool> {
    let b = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    static_elf(&b).with_context(|| format!("{} is not a 64-bit ELF file", p.display()))
}

fn static_elf(b: &[u8]) -> Result<bool> {
    if b.get(0..4) != Some(b"\x7fELF") || b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        bail!("bad ELF header");
    }
    let u16_at = |o: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(
            b.get(o..o + 2).context("truncated")?.try_into()?,
        ))
    };
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            b.get(o..o + 4).context("truncated")?.try_into()?,
        ))
    };
    let u64_at = |o: usize| -> Result<u64> {
        Ok(u64::from_le_bytes(
            b.get(o..o + 8).context("truncated")?.try_into()?,
        ))
    };
    const PT_INTERP: u32 = 3;
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Resolves a program name on the host's PATH (and the sbin directories,
/// which a non-root PATH may lack) to its real file.
pub fn host_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for dir in path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return fs::canonicalize(&p).with_context(|| format!("resolving {}", p.display()));
        }
    }
    bail!("`{name}` not found on this host (cargo xtask setup installs it)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibbpf.so.1 => /lib/x86_64-linux-gnu/libbpf.so.1 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\tlibmissing.so => not found\n";
        assert_eq!(
            ldd_paths(out),
            [
                "/lib/x86_64-linux-gnu/libbpf.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn newc_archive_layout() {
        let mut fs = Initramfs::default();
        fs.bytes("/bin/x", b"hello".to_vec(), 0o755);
        fs.char_dev("/dev/console", 5, 1);
        fs.symlink("/sbin", "bin");
        let dir = tempfile_dir();
        let out = dir.join("t.cpio");
        fs.write(&out).unwrap();
        let b = std::fs::read(&out).unwrap();
        let text = String::from_utf8_lossy(&b);
        // Parent directory first (sorted), every header 4-byte aligned.
        assert!(b.starts_with(b"070701"));
        assert!(text.contains("bin\0"));
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.ends_with("TRAILER!!!\0\0\0\0") || text.contains("TRAILER!!!"));
        assert_eq!(b.len() % 4, 0);
        // The console node: mode 020600, rdev 5:1.
        let at = text.find("00002180").expect("char device mode");
        assert!(at > 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn static_and_dynamic_elf() {
        // This test binary is dynamically linked on glibc hosts.
        let me = std::env::current_exe().unwrap();
        let dynamic = cfg!(target_env = "gnu");
        assert_eq!(is_static_elf(&me).unwrap(), !dynamic);
        assert!(static_elf(b"#!/bin/sh\n").is_err());
    }
}
