//! The allocator's part in the agent's memory. Compiling a policy with a
//! full country database allocates far more than it keeps, in large
//! vectors (ranges, trie nodes, the table's words), on several threads;
//! glibc would keep those pages (in its heap, or in the arena of a thread
//! long gone) and the agent's RSS would grow with every database update.
//! musl's allocator, of the static build, returns them by itself and has
//! neither knob.

/// Allocations from this size up get pages of their own, returned to the
/// kernel when freed. glibc's default starts at 128 KiB but raises itself
/// to the size of the largest block freed (up to 32 MiB), after which the
/// compile's vectors land in the heaps and stay.
#[cfg(target_env = "gnu")]
const OWN_PAGES_FROM: libc::c_int = 256 * 1024;

/// Called first thing, before any thread starts.
pub fn large_allocations_get_own_pages() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, OWN_PAGES_FROM);
    }
}

/// Hands freed pages back after a load, so RSS is what the agent holds.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
