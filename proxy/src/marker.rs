//! The simulation marker: `x-understudy-simulation: 1` on a job means "a copy, or a job a copy
//! caused: no side effects, never to an active machine". It is the balancers' word only.
//!
//! - A job from outside the cluster never carries it: a balancer strips any claim (the marker or
//!   its authentication) from a caller that is not a cluster machine, i.e. neither on an
//!   internal listener nor from an internal source address, and serves the job as a plain one.
//! - Between balancers it is authenticated: a balancer that sends a copy adds
//!   `x-understudy-simulation-auth`, an HMAC-SHA256 with the cluster's marker key over the job's
//!   identity (the copying balancer's service and job number) and the time it was issued. A
//!   simulation machine passes both headers on to its dependencies' balancers (as it would a
//!   trace header); each of those checks the token before routing the job to its simulation
//!   pool and refuses a claim it cannot verify. A token is good for `max_age`.
//! - A simulation machine always receives exactly `x-understudy-simulation: 1`: the balancer
//!   writes the marker itself, never the caller's value.
//!
//! Without a marker key (`--insecure-no-key`) a claim from an internal caller is believed as is.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ipnet::IpNet;
use understudy_hub::SecretKey;

/// A job's claim to be a simulation job: the marker header or its authentication (either one
/// is a claim; neither is ever forwarded as received). The head parser fills it in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MarkerClaim {
    /// The `x-understudy-simulation-auth` value, if any.
    pub token: Option<String>,
}

/// Header set on every copy.
pub const SIMULATION_HEADER: &str = "x-understudy-simulation";
/// The marker's authentication (see the module documentation).
pub const SIMULATION_AUTH_HEADER: &str = "x-understudy-simulation-auth";
/// How long a marker token is good for, by default.
pub const DEFAULT_MARKER_MAX_AGE: Duration = Duration::from_secs(60);
/// How far a token's issue time may be ahead of this host's clock (clock skew between hosts).
const MAX_FUTURE: Duration = Duration::from_secs(5);
const VERSION: &str = "v1";

/// Why a claim to be a simulation job was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkerRejection {
    #[error("a simulation job without {SIMULATION_AUTH_HEADER}")]
    Missing,
    #[error("{SIMULATION_AUTH_HEADER} is malformed")]
    Malformed,
    #[error("{SIMULATION_AUTH_HEADER} does not verify with the cluster's marker key")]
    BadSignature,
    #[error("{SIMULATION_AUTH_HEADER} expired ({age_ms} ms old, at most {max_ms} ms)")]
    Expired { age_ms: u64, max_ms: u64 },
    #[error("{SIMULATION_AUTH_HEADER} was issued in the future ({ahead_ms} ms ahead)")]
    Future { ahead_ms: u64 },
}

impl MarkerRejection {
    /// The `reason` label of `understudy_balancer_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            MarkerRejection::Missing => "marker_unauthenticated",
            MarkerRejection::Malformed => "marker_malformed",
            MarkerRejection::BadSignature => "marker_bad_signature",
            MarkerRejection::Expired { .. } => "marker_expired",
            MarkerRejection::Future { .. } => "marker_from_the_future",
        }
    }

    pub const ALL_REASONS: [&'static str; 5] = [
        "marker_unauthenticated",
        "marker_malformed",
        "marker_bad_signature",
        "marker_expired",
        "marker_from_the_future",
    ];
}

/// What a balancer does with a job, as far as the marker goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// An ordinary job (`stripped`: it claimed to be a simulation job from outside the cluster,
    /// and the claim was dropped).
    Plain {
        stripped: bool,
    },
    /// A verified simulation job: to the simulation pool, with this token passed on.
    Simulation {
        token: Option<String>,
    },
    Refuse(MarkerRejection),
}

/// The marker rules of one balancer process.
#[derive(Debug, Clone)]
pub struct MarkerPolicy {
    key: Option<SecretKey>,
    max_age: Duration,
    internal_sources: Vec<IpNet>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl MarkerPolicy {
    /// `key`: the cluster's marker key (`None` only in insecure mode).
    pub fn new(key: Option<SecretKey>, max_age: Duration, internal_sources: Vec<IpNet>) -> Self {
        MarkerPolicy {
            key,
            max_age,
            internal_sources,
        }
    }

    /// Whether a caller at `peer` is a cluster machine by its address.
    pub(crate) fn is_internal_source(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
                v4 => v4,
            };
            self.internal_sources.iter().any(|net| net.contains(&ip))
        })
    }

    /// Decides what a job's claim (if any) is worth, from a caller that is (or is not) a
    /// cluster machine.
    pub(crate) fn judge(&self, claim: Option<&MarkerClaim>, internal: bool) -> Verdict {
        self.judge_at(claim, internal, wall_ms())
    }

    fn judge_at(&self, claim: Option<&MarkerClaim>, internal: bool, now_ms: u64) -> Verdict {
        let Some(claim) = claim else {
            return Verdict::Plain { stripped: false };
        };
        if !internal {
            return Verdict::Plain { stripped: true };
        }
        let Some(key) = &self.key else {
            return Verdict::Simulation { token: None };
        };
        let Some(token) = &claim.token else {
            return Verdict::Refuse(MarkerRejection::Missing);
        };
        match self.verify(key, token, now_ms) {
            Ok(()) => Verdict::Simulation {
                token: Some(token.clone()),
            },
            Err(rejection) => Verdict::Refuse(rejection),
        }
    }

    /// A token for a copy of job `job` of `service`'s balancer; `None` without a key.
    pub(crate) fn issue(&self, service: &str, job: u64) -> Option<String> {
        self.issue_at(service, job, wall_ms())
    }

    fn issue_at(&self, service: &str, job: u64, now_ms: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let identity = format!("{job}@{service}");
        let tag = key.mac(&signed_bytes(now_ms, &identity));
        Some(format!(
            "{VERSION}.{now_ms}.{}.{}",
            B64.encode(identity),
            B64.encode(tag)
        ))
    }

    fn verify(&self, key: &SecretKey, token: &str, now_ms: u64) -> Result<(), MarkerRejection> {
        let mut parts = token.split('.');
        let (Some(VERSION), Some(issued), Some(identity), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MarkerRejection::Malformed);
        };
        let issued: u64 = issued.parse().map_err(|_| MarkerRejection::Malformed)?;
        let identity = B64
            .decode(identity)
            .map_err(|_| MarkerRejection::Malformed)?;
        let identity = String::from_utf8(identity).map_err(|_| MarkerRejection::Malformed)?;
        let tag = B64.decode(tag).map_err(|_| MarkerRejection::Malformed)?;
        if !key.verify_mac(&signed_bytes(issued, &identity), &tag) {
            return Err(MarkerRejection::BadSignature);
        }
        if issued > now_ms + MAX_FUTURE.as_millis() as u64 {
            return Err(MarkerRejection::Future {
                ahead_ms: issued - now_ms,
            });
        }
        let age_ms = now_ms.saturating_sub(issued);
        if age_ms > self.max_age.as_millis() as u64 {
            return Err(MarkerRejection::Expired {
                age_ms,
                max_ms: self.max_age.as_millis() as u64,
            });
        }
        Ok(())
    }
}

/// What a token's MAC covers: its purpose, format version, issue time and the job's identity.
fn signed_bytes(issued_ms: u64, identity: &str) -> Vec<u8> {
    format!("understudy-simulation-marker\n{VERSION}\n{issued_ms}\n{identity}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(key: Option<u8>) -> MarkerPolicy {
        MarkerPolicy::new(
            key.map(|b| SecretKey::from_bytes(vec![b; 32]).unwrap()),
            Duration::from_secs(60),
            vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        )
    }

    fn claim(token: Option<&str>) -> MarkerClaim {
        MarkerClaim {
            token: token.map(str::to_owned),
        }
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn no_claim_is_a_plain_job_and_an_outside_claim_is_stripped() {
        let p = policy(Some(1));
        assert_eq!(
            p.judge_at(None, true, NOW),
            Verdict::Plain { stripped: false }
        );
        let token = p.issue_at("router", 7, NOW).unwrap();
        // Even a valid token is dropped from a caller outside the cluster.
        assert_eq!(
            p.judge_at(Some(&claim(Some(&token))), false, NOW),
            Verdict::Plain { stripped: true }
        );
    }

    #[test]
    fn an_internal_claim_needs_a_token_that_verifies_and_is_fresh() {
        let p = policy(Some(1));
        let token = p.issue_at("router", 7, NOW).unwrap();
        assert_eq!(
            p.judge_at(Some(&claim(Some(&token))), true, NOW + 1_000),
            Verdict::Simulation {
                token: Some(token.clone())
            }
        );
        let refused = |c: &MarkerClaim, now| match p.judge_at(Some(c), true, now) {
            Verdict::Refuse(r) => r,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(refused(&claim(None), NOW), MarkerRejection::Missing);
        assert_eq!(
            refused(&claim(Some("v1.x.y.z")), NOW),
            MarkerRejection::Malformed
        );
        let forged = policy(Some(2)).issue_at("router", 7, NOW).unwrap();
        assert_eq!(
            refused(&claim(Some(&forged)), NOW),
            MarkerRejection::BadSignature
        );
        // Another job's identity with this MAC does not verify.
        let mut parts: Vec<&str> = token.split('.').collect();
        let other_identity = B64.encode("8@router");
        parts[2] = &other_identity;
        assert_eq!(
            refused(&claim(Some(&parts.join("."))), NOW),
            MarkerRejection::BadSignature
        );
        assert!(matches!(
            refused(&claim(Some(&token)), NOW + 61_000),
            MarkerRejection::Expired { .. }
        ));
        assert!(matches!(
            refused(&claim(Some(&token)), NOW - 6_000),
            MarkerRejection::Future { .. }
        ));
    }

    #[test]
    fn without_a_key_an_internal_claim_is_believed() {
        let p = policy(None);
        assert_eq!(p.issue_at("router", 1, NOW), None);
        assert_eq!(
            p.judge_at(Some(&claim(None)), true, NOW),
            Verdict::Simulation { token: None }
        );
        assert_eq!(
            p.judge_at(Some(&claim(None)), false, NOW),
            Verdict::Plain { stripped: true }
        );
    }

    #[test]
    fn internal_sources_match_by_network() {
        let p = policy(Some(1));
        let internal = |ip: &str| p.is_internal_source(Some(ip.parse().unwrap()));
        assert!(internal("10.1.2.3"));
        assert!(internal("::ffff:10.0.0.1"), "an IPv4-mapped address");
        assert!(internal("::1"));
        assert!(!internal("192.168.1.1"));
        assert!(!internal("127.0.0.1"));
        assert!(!p.is_internal_source(None));
    }
}
