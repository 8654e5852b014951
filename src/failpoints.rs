//! Crash points for the kill tests, compiled only with the `failpoints` feature (never in the
//! default build). See the `failpoint!` macro.

use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

/// Acts when `STRATA_FAILPOINT` names this point and its hit count is reached: prints
/// `STRATA_FAILPOINT_REACHED name`, then freezes the calling thread forever, or for
/// `STRATA_FAILPOINT_PAUSE_SECS` seconds of wall time when that is set (to model a stalled replica),
/// or until the file `STRATA_FAILPOINT_RESUME_FILE` exists when that is set (the test resumes it).
pub fn hit(name: &str) {
    let Ok(wanted) = std::env::var("STRATA_FAILPOINT") else {
        return;
    };
    let (wanted_name, nth) = match wanted.split_once(':') {
        Some((n, count)) => (n.to_string(), count.parse::<usize>().unwrap_or(1)),
        None => (wanted, 1),
    };
    if wanted_name != name {
        return;
    }
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("STRATA_FAILPOINT_REACHED {name}");
        if let Ok(file) = std::env::var("STRATA_FAILPOINT_RESUME_FILE") {
            while !std::path::Path::new(&file).exists() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            return;
        }
        if let Some(secs) = std::env::var("STRATA_FAILPOINT_PAUSE_SECS")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            let until = std::time::SystemTime::now() + std::time::Duration::from_secs(secs);
            // Wall time, so a SIGSTOP during the pause counts towards it.
            while std::time::SystemTime::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            return;
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

static FIRED: AtomicUsize = AtomicUsize::new(0);

/// Whether `STRATA_FAILPOINT_FAULT` (`name[:n]` or `name:n-m`) names this point and this is its
/// n-th hit (default 1), or one of its n-th to m-th: for faults a test injects without freezing
/// the process (a lost answer, a refusal that lasts a few attempts).
pub fn fires(name: &str) -> bool {
    let Ok(wanted) = std::env::var("STRATA_FAILPOINT_FAULT") else {
        return false;
    };
    let (wanted_name, first, last) = match wanted.split_once(':') {
        Some((n, hits)) => {
            let (first, last) = hits.split_once('-').unwrap_or((hits, hits));
            let first = first.parse::<usize>().unwrap_or(1);
            (n.to_string(), first, last.parse::<usize>().unwrap_or(first))
        }
        None => (wanted, 1, 1),
    };
    if wanted_name != name {
        return false;
    }
    let hit = FIRED.fetch_add(1, Ordering::SeqCst) + 1;
    (first..=last).contains(&hit)
}
