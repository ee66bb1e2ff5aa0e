//! Shared pieces of the load and machine specs: field-named errors and delay distributions.

use rand::Rng;
use rand_distr::{Distribution, Exp, LogNormal};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A spec that was refused: which field (dotted path, e.g. `faults.hang.fraction`) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: String,
    pub problem: String,
}

impl SpecError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Reads a spec from TOML text. A value that does not fit is named by its path in the spec
/// (`faults.hang.fraction`; `what`, e.g. "load spec", when it is the document itself), and the
/// problem by its line and column.
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> Result<T, SpecError> {
    understudy_tomlread::read(text).map_err(|e| {
        let problem = e.located();
        SpecError::new(e.field.unwrap_or_else(|| what.to_string()), problem)
    })
}

pub(crate) fn join(prefix: &str, field: &str) -> String {
    if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

/// `value` must be finite and within `min..=max`.
pub(crate) fn check_range(field: &str, value: f64, min: f64, max: f64) -> Result<f64, SpecError> {
    if value.is_finite() && value >= min && value <= max {
        Ok(value)
    } else {
        Err(SpecError::new(
            field,
            format!("must be a number within {min}..={max}, got {value}"),
        ))
    }
}

/// `value` must be finite and strictly positive.
pub(crate) fn check_positive(field: &str, value: f64) -> Result<f64, SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(SpecError::new(
            field,
            format!("must be a positive number, got {value}"),
        ))
    }
}

/// Checks the fields given beside `kind`: each must belong to the kind. Tagged enums are read
/// through a flat struct of every kind's fields (see [`DelayFields`]) rather than serde's
/// internally tagged form, which buffers the table and so loses the position and name of a
/// field of the wrong type.
pub(crate) fn fields_of_kind(
    kind: &str,
    given: &[(&'static str, bool)],
    takes: &[&str],
) -> Result<(), String> {
    match given
        .iter()
        .find(|(name, set)| *set && !takes.contains(name))
    {
        None => Ok(()),
        Some((name, _)) if takes.is_empty() => Err(format!(
            "unknown field `{name}`: kind = \"{kind}\" takes no other field"
        )),
        Some((name, _)) => Err(format!(
            "unknown field `{name}` for kind = \"{kind}\", expected one of `{}`",
            takes.join("`, `")
        )),
    }
}

/// A field `kind` requires.
pub(crate) fn needed<T>(kind: &str, name: &str, value: Option<T>) -> Result<T, String> {
    value.ok_or_else(|| format!("missing field `{name}` (required by kind = \"{kind}\")"))
}

/// A distribution of durations in milliseconds, as written in TOML:
/// `{ kind = "lognormal", median_ms = 2.0, sigma = 0.5 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "DelayFields")]
pub enum DelaySpec {
    Constant {
        ms: f64,
    },
    Uniform {
        min_ms: f64,
        max_ms: f64,
    },
    Exponential {
        mean_ms: f64,
    },
    Lognormal {
        median_ms: f64,
        sigma: f64,
    },
    /// Two modes: most jobs near `fast_ms`, `slow_fraction` of them near `slow_ms`; each mode is
    /// lognormal with `sigma` (0 = exactly the mode).
    Bimodal {
        fast_ms: f64,
        slow_ms: f64,
        slow_fraction: f64,
        /// Default 0.
        sigma: f64,
    },
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum DelayKind {
    Constant,
    Uniform,
    Exponential,
    Lognormal,
    Bimodal,
}

/// Every field of every [`DelaySpec`] kind, as read from TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelayFields {
    kind: DelayKind,
    ms: Option<f64>,
    min_ms: Option<f64>,
    max_ms: Option<f64>,
    mean_ms: Option<f64>,
    median_ms: Option<f64>,
    sigma: Option<f64>,
    fast_ms: Option<f64>,
    slow_ms: Option<f64>,
    slow_fraction: Option<f64>,
}

impl TryFrom<DelayFields> for DelaySpec {
    type Error = String;

    fn try_from(f: DelayFields) -> Result<Self, String> {
        let (name, takes): (&str, &[&str]) = match f.kind {
            DelayKind::Constant => ("constant", &["ms"]),
            DelayKind::Uniform => ("uniform", &["min_ms", "max_ms"]),
            DelayKind::Exponential => ("exponential", &["mean_ms"]),
            DelayKind::Lognormal => ("lognormal", &["median_ms", "sigma"]),
            DelayKind::Bimodal => ("bimodal", &["fast_ms", "slow_ms", "slow_fraction", "sigma"]),
        };
        let given = [
            ("ms", f.ms.is_some()),
            ("min_ms", f.min_ms.is_some()),
            ("max_ms", f.max_ms.is_some()),
            ("mean_ms", f.mean_ms.is_some()),
            ("median_ms", f.median_ms.is_some()),
            ("sigma", f.sigma.is_some()),
            ("fast_ms", f.fast_ms.is_some()),
            ("slow_ms", f.slow_ms.is_some()),
            ("slow_fraction", f.slow_fraction.is_some()),
        ];
        fields_of_kind(name, &given, takes)?;
        Ok(match f.kind {
            DelayKind::Constant => DelaySpec::Constant {
                ms: needed(name, "ms", f.ms)?,
            },
            DelayKind::Uniform => DelaySpec::Uniform {
                min_ms: needed(name, "min_ms", f.min_ms)?,
                max_ms: needed(name, "max_ms", f.max_ms)?,
            },
            DelayKind::Exponential => DelaySpec::Exponential {
                mean_ms: needed(name, "mean_ms", f.mean_ms)?,
            },
            DelayKind::Lognormal => DelaySpec::Lognormal {
                median_ms: needed(name, "median_ms", f.median_ms)?,
                sigma: needed(name, "sigma", f.sigma)?,
            },
            DelayKind::Bimodal => DelaySpec::Bimodal {
                fast_ms: needed(name, "fast_ms", f.fast_ms)?,
                slow_ms: needed(name, "slow_ms", f.slow_ms)?,
                slow_fraction: needed(name, "slow_fraction", f.slow_fraction)?,
                sigma: f.sigma.unwrap_or(0.0),
            },
        })
    }
}

impl DelaySpec {
    pub fn constant_ms(ms: f64) -> Self {
        DelaySpec::Constant { ms }
    }

    /// Checks every number and builds the sampler; `field` names this spec in errors.
    pub fn validate(&self, field: &str) -> Result<Delay, SpecError> {
        let f = |name: &str| join(field, name);
        Ok(match *self {
            DelaySpec::Constant { ms } => Delay::Constant(check_range(&f("ms"), ms, 0.0, 3.6e6)?),
            DelaySpec::Uniform { min_ms, max_ms } => {
                let min = check_range(&f("min_ms"), min_ms, 0.0, 3.6e6)?;
                let max = check_range(&f("max_ms"), max_ms, 0.0, 3.6e6)?;
                if max < min {
                    return Err(SpecError::new(
                        f("max_ms"),
                        format!("must be at least min_ms ({min}), got {max}"),
                    ));
                }
                Delay::Uniform { min, max }
            }
            DelaySpec::Exponential { mean_ms } => {
                let mean = check_positive(&f("mean_ms"), mean_ms)?;
                Delay::Exponential(
                    Exp::new(1.0 / mean)
                        .map_err(|e| SpecError::new(f("mean_ms"), e.to_string()))?,
                )
            }
            DelaySpec::Lognormal { median_ms, sigma } => {
                lognormal(&f("median_ms"), median_ms, &f("sigma"), sigma)?
            }
            DelaySpec::Bimodal {
                fast_ms,
                slow_ms,
                slow_fraction,
                sigma,
            } => {
                let slow_fraction = check_range(&f("slow_fraction"), slow_fraction, 0.0, 1.0)?;
                Delay::Bimodal {
                    fast: Box::new(lognormal(&f("fast_ms"), fast_ms, &f("sigma"), sigma)?),
                    slow: Box::new(lognormal(&f("slow_ms"), slow_ms, &f("sigma"), sigma)?),
                    slow_fraction,
                }
            }
        })
    }
}

/// A lognormal with the given median; sigma 0 degenerates to a constant.
fn lognormal(
    median_field: &str,
    median_ms: f64,
    sigma_field: &str,
    sigma: f64,
) -> Result<Delay, SpecError> {
    let median = check_range(median_field, median_ms, 0.0, 3.6e6)?;
    let sigma = check_range(sigma_field, sigma, 0.0, 10.0)?;
    if sigma == 0.0 || median == 0.0 {
        return Ok(Delay::Constant(median));
    }
    LogNormal::new(median.ln(), sigma)
        .map(Delay::LogNormal)
        .map_err(|e| SpecError::new(sigma_field, e.to_string()))
}

/// A validated delay distribution.
#[derive(Debug, Clone)]
pub enum Delay {
    Constant(f64),
    Uniform {
        min: f64,
        max: f64,
    },
    Exponential(Exp<f64>),
    LogNormal(LogNormal<f64>),
    Bimodal {
        fast: Box<Delay>,
        slow: Box<Delay>,
        slow_fraction: f64,
    },
}

impl Delay {
    /// One draw, in milliseconds. Always draws the same number of values from `rng` for a given
    /// variant, so schedules stay aligned across runs.
    pub fn sample_ms<R: Rng + ?Sized>(&self, rng: &mut R) -> f64 {
        match self {
            Delay::Constant(ms) => *ms,
            Delay::Uniform { min, max } => min + (max - min) * rng.gen::<f64>(),
            Delay::Exponential(exp) => exp.sample(rng),
            Delay::LogNormal(ln) => ln.sample(rng),
            Delay::Bimodal {
                fast,
                slow,
                slow_fraction,
            } => {
                if rng.gen::<f64>() < *slow_fraction {
                    slow.sample_ms(rng)
                } else {
                    fast.sample_ms(rng)
                }
            }
        }
    }

    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        ms_to_duration(self.sample_ms(rng))
    }
}

pub(crate) fn ms_to_duration(ms: f64) -> Duration {
    Duration::from_nanos((ms.max(0.0) * 1e6).min(3.6e12) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn lognormal_median_is_the_median() {
        let d = DelaySpec::Lognormal {
            median_ms: 10.0,
            sigma: 0.5,
        }
        .validate("latency")
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut v: Vec<f64> = (0..20_001).map(|_| d.sample_ms(&mut rng)).collect();
        v.sort_by(f64::total_cmp);
        let median = v[10_000];
        assert!((9.5..10.5).contains(&median), "median {median}");
    }

    #[test]
    fn bimodal_puts_the_slow_fraction_in_the_slow_mode() {
        let d = DelaySpec::Bimodal {
            fast_ms: 1.0,
            slow_ms: 50.0,
            slow_fraction: 0.2,
            sigma: 0.0,
        }
        .validate("latency")
        .unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let slow = (0..10_000).filter(|_| d.sample_ms(&mut rng) > 25.0).count();
        assert!((1_800..2_200).contains(&slow), "slow {slow}");
    }

    #[test]
    fn bad_numbers_name_their_field() {
        let err = DelaySpec::Uniform {
            min_ms: 5.0,
            max_ms: 1.0,
        }
        .validate("mix.voice_call.length")
        .unwrap_err();
        assert_eq!(err.field, "mix.voice_call.length.max_ms");
        let err = DelaySpec::Bimodal {
            fast_ms: 1.0,
            slow_ms: 5.0,
            slow_fraction: 1.5,
            sigma: 0.0,
        }
        .validate("latency")
        .unwrap_err();
        assert_eq!(err.field, "latency.slow_fraction");
        let err = DelaySpec::Constant { ms: f64::NAN }
            .validate("latency")
            .unwrap_err();
        assert_eq!(err.field, "latency.ms");
    }
}
