//! Kafka clients: the consumer thread with its rebalance handshake ([`consumer`]), the shared
//! client settings and the idempotent producer's settings (here), and the admin side ([`admin`]:
//! finding and creating the topics Strata produces to).
//!
//! Nothing here decides what a record means or when an offset may move: that stays with the
//! pipeline and the commit protocol.

pub mod admin;
pub mod claims;
mod commits;
pub mod consumer;
pub mod event_loop;
mod fetch;
pub mod producer;
mod queue;

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

/// Properties only a consumer understands: a producer or admin client would warn about them.
const CONSUMER_ONLY: [&str; 6] = [
    "group.",
    "partition.assignment",
    "auto.",
    "session.timeout",
    "heartbeat.interval",
    "max.poll.interval",
];

/// A client's settings: the brokers and every `STRATA_KAFKA_*` property (security, SASL, TLS,
/// timeouts...) except those only a consumer understands.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, String>) -> ClientConfig {
    let mut config = ClientConfig::new();
    pass_through(&mut config, brokers, properties);
    config
}

/// An idempotent producer's settings: acks from all replicas, in order, no duplicates from
/// internal retries, batches compressed with `compression` (`STRATA_PRODUCER_COMPRESSION`).
pub fn producer_config(
    brokers: &str,
    properties: &BTreeMap<String, String>,
    compression: &str,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", compression);
    // The user's properties come last, so they can override the defaults above.
    pass_through(&mut config, brokers, properties);
    config
}

fn pass_through(config: &mut ClientConfig, brokers: &str, properties: &BTreeMap<String, String>) {
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        if !CONSUMER_ONLY.iter().any(|prefix| key.starts_with(prefix)) {
            config.set(key, value);
        }
    }
}

/// The librdkafka this binary links: its version and `builtin.features` (which security
/// protocols, SASL mechanisms and codecs it can use), for the start-up log and `strata --version`.
pub fn librdkafka_build() -> (String, String) {
    let (_, version) = rdkafka::util::get_rdkafka_version();
    let features = ClientConfig::new()
        .create_native_config()
        .and_then(|native| native.get("builtin.features"))
        .unwrap_or_else(|e| format!("unknown ({e})"));
    (version, features)
}

/// Why the cluster refuses this client or cannot be reached, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionProblem {
    pub reason: String,
    /// A refusal with a cause (authentication, TLS trust, mechanism, authorization), as opposed
    /// to "no broker reachable", which follows every refusal and must not hide its cause.
    pub specific: bool,
}

/// The [`ConnectionProblem`] a librdkafka error reports: authentication, TLS trust, an
/// unsupported SASL mechanism, or no broker reachable at all. `None` for errors librdkafka
/// retries routinely (a dropped idle connection).
pub fn connection_problem(
    error: &rdkafka::error::KafkaError,
    reason: &str,
    properties: &BTreeMap<String, String>,
) -> Option<ConnectionProblem> {
    let specific = !matches!(
        error.rdkafka_error_code(),
        Some(rdkafka::error::RDKafkaErrorCode::AllBrokersDown)
    );
    // librdkafka also reports "0/N brokers are down" while it swaps bootstrap connections.
    if !specific && reason.starts_with("0/") {
        return None;
    }
    // "(after 15ms in state AUTH_REQ, 3 identical error(s) suppressed)" changes every time: the
    // same refusal must read the same, so it is logged once.
    let reason = reason.split(" (after ").next().unwrap_or(reason);
    describe(error, reason, properties).map(|reason| ConnectionProblem { reason, specific })
}

fn describe(
    error: &rdkafka::error::KafkaError,
    reason: &str,
    properties: &BTreeMap<String, String>,
) -> Option<String> {
    use rdkafka::error::RDKafkaErrorCode as Code;
    let code = error.rdkafka_error_code()?;
    let lower = reason.to_ascii_lowercase();
    let mechanism = properties
        .get("sasl.mechanism")
        .or_else(|| properties.get("sasl.mechanisms"))
        .map(String::as_str)
        .unwrap_or("GSSAPI");
    let protocol = properties
        .get("security.protocol")
        .map(String::as_str)
        .unwrap_or("plaintext");
    let tls_trust = lower.contains("certificate verify failed")
        || lower.contains("unable to get local issuer")
        || lower.contains("self-signed certificate")
        || lower.contains("self signed certificate");
    match code {
        Code::UnsupportedSASLMechanism => Some(format!(
            "the brokers do not support SASL mechanism {mechanism}: {reason}"
        )),
        Code::Authentication | Code::SaslAuthenticationFailed
            if lower.contains("unsupported sasl mechanism") || lower.contains("not supported") =>
        {
            Some(format!(
                "the brokers do not support SASL mechanism {mechanism}: {reason}"
            ))
        }
        Code::Authentication | Code::SaslAuthenticationFailed | Code::IllegalSASLState => Some(
            format!("authentication failed for SASL mechanism {mechanism} ({protocol}): {reason}"),
        ),
        Code::BrokerTransportFailure | Code::SSL if tls_trust => Some(format!(
            "the brokers' TLS certificate is not trusted (check ssl.ca.location): {reason}"
        )),
        Code::SSL => Some(format!(
            "TLS with the brokers failed ({protocol}): {reason}"
        )),
        Code::BrokerTransportFailure
            if lower.contains("ssl") || lower.contains("sasl") || lower.contains("handshake") =>
        {
            Some(format!(
                "cannot connect to the brokers ({protocol}): {reason}"
            ))
        }
        Code::AllBrokersDown => Some(format!("no broker reachable ({protocol}): {reason}")),
        Code::TopicAuthorizationFailed
        | Code::GroupAuthorizationFailed
        | Code::ClusterAuthorizationFailed => {
            Some(format!("the cluster refuses this principal: {reason}"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

    use super::*;

    #[test]
    fn refusals_are_named_and_routine_disconnects_are_not() {
        let properties: BTreeMap<String, String> = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let named = |code, reason: &str| {
            connection_problem(&KafkaError::Global(code), reason, &properties).map(|p| p.reason)
        };
        let auth = named(
            Code::Authentication,
            "SASL authentication error: bad password",
        );
        assert!(
            auth.as_deref().is_some_and(
                |a| a.contains("authentication failed for SASL mechanism SCRAM-SHA-512")
            ),
            "{auth:?}"
        );
        let trust = named(
            Code::SSL,
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed",
        );
        assert!(
            trust.as_deref().is_some_and(|t| t.contains("not trusted")),
            "{trust:?}"
        );
        let mechanism = named(Code::UnsupportedSASLMechanism, "Unsupported SASL mechanism");
        assert!(
            mechanism
                .as_deref()
                .is_some_and(|m| m.contains("do not support SASL mechanism")),
            "{mechanism:?}"
        );
        assert_eq!(
            named(
                Code::BrokerTransportFailure,
                "Disconnected (after 60000ms in state UP)"
            ),
            None
        );
        let down = connection_problem(
            &KafkaError::Global(Code::AllBrokersDown),
            "1/1 brokers are down",
            &properties,
        );
        assert!(down.is_some_and(|d| !d.specific));
        assert_eq!(named(Code::AllBrokersDown, "0/1 brokers are down"), None);
    }
}
