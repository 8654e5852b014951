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

/// Whether `STRATA_FAILPOINT_FAULT` (`name[:n]`) names this point and this is its n-th hit (default
/// 1): for faults a test injects without freezing the process (a lost answer).
pub fn fires(name: &str) -> bool {
    let Ok(wanted) = std::env::var("STRATA_FAILPOINT_FAULT") else {
        return false;
    };
    let (wanted_name, nth) = match wanted.split_once(':') {
        Some((n, count)) => (n.to_string(), count.parse::<usize>().unwrap_or(1)),
        None => (wanted, 1),
    };
    wanted_name == name && FIRED.fetch_add(1, Ordering::SeqCst) + 1 == nth
}
