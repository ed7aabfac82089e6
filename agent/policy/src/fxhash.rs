//! FxHash (the hash rustc uses for its own tables): for maps keyed by data
//! the agent made itself (trie nodes, database record offsets), hashed by
//! the million during a compile. SipHash's defence against chosen keys
//! buys nothing there and costs a third of the compile.

use std::hash::{BuildHasherDefault, Hasher};

pub type FxBuild = BuildHasherDefault<FxHasher>;

#[derive(Default)]
pub struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
