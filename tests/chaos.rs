//! Chaos (tansu + moto, the real binary): three replicas, records flowing the whole time, and a
//! random replica restarted every few seconds, by SIGKILL or SIGTERM at random. Afterwards every
//! good Bronze record is once in Silver, every bad one in the dead-letter topic, and the replicas
//! that end the run are alive and account for what they consumed.
//!
//! `make test` runs a short form (`STRATA_CHAOS_RESTARTS`, default 4); `make chaos` runs 10
//! restarts or more over a longer stream. Dead letters are compared as a set: a kill between a
//! letter's acknowledgement and the commit of its offset sends it again (README, *Guarantees*).

mod common;

use std::time::{Duration, Instant};

use common::{outlive_dead_member, produce, Replica, Setup};

/// A tiny deterministic generator (xorshift), seeded from the clock and printed, so a failing
/// run can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_restarted_at_random_while_data_flows_lose_and_duplicate_nothing() {
    let (restarts, seed) = common::chaos_run("chaos");
    let mut rng = Rng(seed);
    let setup = Setup::new("chaos", 6).await;
    let mut replicas: Vec<Replica> = (0..3).map(|_| setup.spawn(&[])).collect();
    let mut produced = produce(&setup.topic, 3_000, 50, seed).await;
    let started = Instant::now();
    for round in 0..restarts {
        // Records keep coming between restarts.
        produced.extend(produce(&setup.topic, 1_500, 50, seed.wrapping_add(round + 1)).await);
        tokio::time::sleep(Duration::from_millis(500 + rng.below(3_000))).await;
        let victim = rng.below(replicas.len() as u64) as usize;
        let kill = rng.below(2) == 0;
        common::restart_one(&mut replicas, victim, kill, round, || setup.spawn(&[]));
    }
    let last_restart = Instant::now();
    produced.extend(produce(&setup.topic, 1_500, 50, seed.wrapping_add(1_000)).await);
    // A SIGKILLed member holds its partitions until its session expires. tansu does not
    // rebalance when a session expires (a Kafka broker does), only when a member joins or
    // leaves: a replica joins once the dead members' sessions are over, which hands their
    // partitions to the live ones.
    outlive_dead_member().await;
    replicas.push(setup.spawn(&[]));
    let refs: Vec<&Replica> = replicas.iter().collect();
    setup.catch_up(&produced, &refs).await;
    eprintln!(
        "chaos: {} records, {restarts} restarts, caught up {:?} after the start and {:?} after \
         the last restart (a SIGKILLed member's session of 15 s included)",
        produced.good.len() + produced.bad.len(),
        started.elapsed(),
        last_restart.elapsed()
    );
    for replica in &mut replicas {
        assert!(
            replica.is_running(),
            "a replica died:\n{}",
            replica.tail(30)
        );
    }
    for replica in &replicas {
        // A replica that joined last may have found everything read already.
        if replica
            .metric("strata_records_consumed_total")
            .await
            .unwrap_or(0.0)
            > 0.0
        {
            common::assert_accounting(replica).await;
        }
    }
    for replica in replicas {
        replica.stop(Duration::from_secs(45));
    }
    setup.assert_exact(&produced).await;
    // Dead letters are at least once: a kill between a letter's acknowledgement and the commit of
    // its offset sends it again on replay (its headers name the source offset).
    let letters = common::assert_dead_letters_are(
        &common::brokers(),
        &format!("{}.dlq", setup.topic),
        &produced,
    )
    .await;
    eprintln!(
        "chaos: {letters} dead letters for {} bad records",
        produced.bad.len()
    );
}
