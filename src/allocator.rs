//! The process's memory allocator: mimalloc, tuned to hand freed memory back at once.
//!
//! Why not glibc's: a chat turn allocates and frees on many threads (tokio workers, the SQLite
//! writer and readers), and in a loaded profile glibc's malloc, free and consolidation were ~15 %
//! of the samples; with mimalloc, chat throughput at 64 conversations rose by a fifth or more
//! (docs/benchmarks.md, issue #8).
//! Why tuned: by default mimalloc v3 commits its arenas eagerly and purges freed memory a second
//! later, and only when it is next called; after a flood of failed sign-ins (argon2 takes 19 MiB
//! per hash) the server then stayed at ~120 MiB. Lazy commit and immediate purging keep it where
//! glibc kept it, under the 100 MiB target of issue #9 (`scripts/bench-signin-flood`), at no
//! measurable cost in throughput.

/// The allocator to install with `#[global_allocator]` (the binary and the benchmark do).
pub type Allocator = mimalloc::MiMalloc;

// mimalloc v3's option numbers (`mi_option_e` in its `mimalloc.h`): libmimalloc-sys names only
// v2's. The test below checks each against its default, so a mimalloc that renumbers them fails
// the tests instead of tuning the wrong knob.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the options above. It must run before the first allocation: mimalloc reserves its
/// first arena then, committed or not by the option's value at that moment. A binary runs it
/// from its ELF `.init_array` ([`tune_before_main!`]), ahead of Rust's runtime set-up.
pub extern "C" fn tune() {
    // SAFETY: `mi_option_set` stores a value in mimalloc's option table; both numbers are
    // options of the linked mimalloc (checked by the test below), and no other thread runs yet.
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(PURGE_DELAY, 0);
    }
}

/// Runs [`tune`] before `main`, from the executable's `.init_array` (Linux): a static in a
/// library could be dropped by the linker, so each binary expands this itself.
#[macro_export]
macro_rules! tune_before_main {
    () => {
        #[cfg(target_os = "linux")]
        #[used]
        #[link_section = ".init_array"]
        static TUNE_ALLOCATOR: extern "C" fn() = $crate::allocator::tune;
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_are_the_linked_mimallocs() {
        // Defaults from mimalloc v3's options.c: arena_eager_commit 2 ("only where the OS
        // overcommits"), purge_delay 1000 ms. Read only: this test must not tune the allocator.
        // SAFETY: reading mimalloc's option table; the test harness's threads do not write it.
        let (eager, delay) = unsafe {
            (
                libmimalloc_sys::mi_option_get(ARENA_EAGER_COMMIT),
                libmimalloc_sys::mi_option_get(PURGE_DELAY),
            )
        };
        assert_eq!((eager, delay), (2, 1000));
    }
}
