//! Crash points for the kill tests, compiled only with the `failpoints` feature (never in the
//! default build). See the `failpoint!` macro.

use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Freezes the process forever when `STRATA_FAILPOINT` names this point and its hit count is reached.
pub fn hit(name: &str) {
    let Ok(wanted) = std::env::var("STRATA_FAILPOINT") else { return };
    let (wanted_name, nth) = match wanted.split_once(':') {
        Some((n, count)) => (n.to_string(), count.parse::<usize>().unwrap_or(1)),
        None => (wanted, 1),
    };
    if wanted_name != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("STRATA_FAILPOINT_REACHED {name}");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
