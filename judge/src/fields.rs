//! Answers compared field by field, with the noise subtracted (`compare = "fields"`).
//!
//! The balancer reports, per job, the paths where a copy's answer differs from the active one's
//! (v1's): v2's copy, and the A/A control's copy of the same job when a control runs. A field
//! that differs between two v1s (a timestamp, a request id) differs on both sides and tells
//! nothing about v2; a field v2 changed differs on v2's side only. So the mismatch test of the
//! condition is fed, per job, `[v2 differs in a field where the control does not] - [the control
//! differs in a field where v2 does not]`: under A/A the two copies are exchangeable, so its
//! mean is 0 however noisy the answers are, and it is tested against `max_mismatch_rate` with the
//! mismatch test's own share of the false-fail budget (this test replaces it, so nothing more is
//! spent). Without a control on the job, the statistic is `[v2 differs in some field]`.
//!
//! Each field (at most [`MAX_FIELDS`] per rollout, the rest under [`OTHER_FIELD`]) also has a
//! test of `[it differs for v2] - [it differs for the control]`, to name the fields behind a
//! failure; those tests decide nothing. A field is a regression when its test fails, noise when
//! the control differs there in a clear share of jobs and its test did not fail.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::sequential::{Evidence, MarginReport, MarginTest};
use crate::{compared_answers, evidence_text, rate, Judge, PairSample};

/// Distinct field paths tested per rollout; further ones count under [`OTHER_FIELD`].
pub const MAX_FIELDS: usize = 64;
/// Where the fields past [`MAX_FIELDS`] are counted.
pub const OTHER_FIELD: &str = "(other)";
/// A field is noise once the control differs there in at least this many jobs...
const NOISE_MIN_COUNT: u64 = 5;
/// ...and in at least this share of the jobs with a control.
const NOISE_MIN_RATE: f64 = 0.01;
/// Fields named in a rule when none has failed its own test.
const NAMED_IN_RULE: usize = 3;

/// Where one copy's answer differs from the active answer of the same job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerFields {
    /// Differing paths, each once.
    pub paths: Vec<FieldValues>,
}

/// One differing path and a sample of its values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldValues {
    pub path: String,
    /// The active (v1) answer's value, JSON text; `None` where it has no such field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v1: Option<String>,
    /// The copy's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

impl AnswerFields {
    fn has(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p.path == path)
    }

    /// Whether this answer differs in a path `other` does not differ in.
    fn differs_beyond(&self, other: Option<&AnswerFields>) -> bool {
        self.paths
            .iter()
            .any(|p| other.is_none_or(|o| !o.has(&p.path)))
    }
}

/// What a field is, as its counts and test show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldClass {
    /// Its test shows v2 differing there beyond the control's noise.
    Regression,
    /// The control differs there too, in a clear share of jobs: not v2's doing.
    Noise,
    /// Its test shows v2 within the margin.
    Ok,
    /// Neither yet.
    Open,
}

/// A sample pair of differing values: v1's, and the copy's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValuePair {
    pub v1: Option<String>,
    pub copy: Option<String>,
}

/// One field path's counts and test.
#[derive(Debug, Clone)]
struct FieldTest {
    v2: u64,
    control: u64,
    test: MarginTest,
    v2_sample: Option<ValuePair>,
    control_sample: Option<ValuePair>,
}

/// One field as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldReport {
    pub path: String,
    /// Jobs where v2's answer differs from v1's there.
    pub v2_differs: u64,
    pub v2_rate: f64,
    /// Jobs where the control's answer differs from v1's there.
    pub control_differs: u64,
    /// Among jobs with a control; `None` without any.
    pub control_rate: Option<f64>,
    pub class: FieldClass,
    /// The test of `[differs for v2] - [differs for the control]` against the margin.
    pub test: MarginReport,
    /// First differing values seen on v2's side (regressions and noise only).
    pub v2_sample: Option<ValuePair>,
    /// First differing values seen on the control's side (regressions and noise only).
    pub control_sample: Option<ValuePair>,
}

/// Every field of a rollout, most differing on v2's side first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldsReport {
    /// Jobs compared field by field.
    pub jobs: u64,
    /// Of which with the control's answer to subtract.
    pub control_jobs: u64,
    pub fields: Vec<FieldReport>,
}

/// The field tests of one rollout.
#[derive(Debug, Clone)]
pub struct FieldTests {
    margin: f64,
    field_alpha: f64,
    pass_alpha: f64,
    interval_alpha: f64,
    /// The aggregate statistic: the condition's mismatch test in fields mode.
    aggregate: MarginTest,
    jobs: u64,
    control_jobs: u64,
    fields: BTreeMap<String, FieldTest>,
}

impl FieldTests {
    /// Tests against `margin` (`max_mismatch_rate`): the aggregate fails with probability at most
    /// `fail_alpha` under A/A; the per-field tests share the same level among [`MAX_FIELDS`] + 1.
    pub fn new(margin: f64, fail_alpha: f64, pass_alpha: f64, interval_alpha: f64) -> Self {
        FieldTests {
            margin,
            field_alpha: fail_alpha / (MAX_FIELDS + 1) as f64,
            pass_alpha,
            interval_alpha,
            aggregate: MarginTest::new(margin, -1.0, 1.0, fail_alpha, pass_alpha, interval_alpha),
            jobs: 0,
            control_jobs: 0,
            fields: BTreeMap::new(),
        }
    }

    /// The test the condition decides on in fields mode.
    pub fn aggregate(&self) -> &MarginTest {
        &self.aggregate
    }

    /// One job: where v2's answer differs from v1's and, when a control answered the same job,
    /// where the control's does.
    pub fn observe(&mut self, v2: &AnswerFields, control: Option<&AnswerFields>) {
        let v2_only = v2.differs_beyond(control);
        let control_only = control.is_some_and(|c| c.differs_beyond(Some(v2)));
        self.aggregate
            .observe(f64::from(u8::from(v2_only)) - f64::from(u8::from(control_only)));
        let v2_keys = self.keys(v2);
        let control_keys = control.map(|c| self.keys(c)).unwrap_or_default();
        for key in v2_keys.iter().chain(&control_keys) {
            self.track(key);
        }
        for (key, field) in &mut self.fields {
            let (in_v2, in_control) = (v2_keys.contains(key), control_keys.contains(key));
            field
                .test
                .observe(f64::from(u8::from(in_v2)) - f64::from(u8::from(in_control)));
            field.v2 += u64::from(in_v2);
            field.control += u64::from(in_control);
            if in_v2 && field.v2_sample.is_none() {
                field.v2_sample = sample(v2, key);
            }
            if in_control && field.control_sample.is_none() {
                field.control_sample = control.and_then(|c| sample(c, key));
            }
        }
        self.jobs += 1;
        self.control_jobs += u64::from(control.is_some());
    }

    /// The tracked names of an answer's differing paths: past the cap, [`OTHER_FIELD`].
    fn keys(&self, answer: &AnswerFields) -> BTreeSet<String> {
        let mut room = MAX_FIELDS.saturating_sub(self.fields.len());
        let mut keys = BTreeSet::new();
        for p in &answer.paths {
            let known = self.fields.contains_key(&p.path) || keys.contains(&p.path);
            if known || room > 0 {
                room -= usize::from(!known);
                keys.insert(p.path.clone());
            } else {
                keys.insert(OTHER_FIELD.to_string());
            }
        }
        keys
    }

    /// A field seen for the first time: its test has seen every earlier job, where it did not
    /// differ on either side.
    fn track(&mut self, key: &str) {
        if self.fields.contains_key(key) {
            return;
        }
        let mut test = MarginTest::new(
            self.margin,
            -1.0,
            1.0,
            self.field_alpha,
            self.pass_alpha,
            self.interval_alpha,
        );
        for _ in 0..self.jobs {
            test.observe(0.0);
        }
        let field = FieldTest {
            v2: 0,
            control: 0,
            test,
            v2_sample: None,
            control_sample: None,
        };
        self.fields.insert(key.to_string(), field);
    }

    fn class(&self, field: &FieldTest) -> FieldClass {
        let evidence = field.test.evidence();
        let control_rate = rate(field.control, self.control_jobs);
        if evidence == Evidence::Fail {
            FieldClass::Regression
        } else if field.control >= NOISE_MIN_COUNT && control_rate >= NOISE_MIN_RATE {
            FieldClass::Noise
        } else if evidence == Evidence::Pass {
            FieldClass::Ok
        } else {
            FieldClass::Open
        }
    }

    pub fn report(&self) -> FieldsReport {
        let mut fields: Vec<FieldReport> = self
            .fields
            .iter()
            .map(|(path, f)| {
                let class = self.class(f);
                let shown = matches!(class, FieldClass::Regression | FieldClass::Noise);
                FieldReport {
                    path: path.clone(),
                    v2_differs: f.v2,
                    v2_rate: rate(f.v2, self.jobs),
                    control_differs: f.control,
                    control_rate: (self.control_jobs > 0)
                        .then(|| rate(f.control, self.control_jobs)),
                    class,
                    test: f.test.report(),
                    v2_sample: f.v2_sample.clone().filter(|_| shown),
                    control_sample: f.control_sample.clone().filter(|_| shown),
                }
            })
            .collect();
        fields.sort_by(|a, b| {
            let excess = |f: &FieldReport| f.v2_differs as i64 - f.control_differs as i64;
            excess(b).cmp(&excess(a)).then_with(|| a.path.cmp(&b.path))
        });
        FieldsReport {
            jobs: self.jobs,
            control_jobs: self.control_jobs,
            fields,
        }
    }

    /// The fields behind a failed aggregate test: those whose own test failed, else the ones
    /// v2 differs in most beyond the control; each with a sample of v2's values.
    pub fn blamed(&self) -> Vec<FieldReport> {
        let report = self.report().fields;
        let failed: Vec<FieldReport> = report
            .iter()
            .filter(|f| f.class == FieldClass::Regression)
            .cloned()
            .collect();
        if !failed.is_empty() {
            return failed;
        }
        report
            .into_iter()
            .filter(|f| f.v2_differs > f.control_differs)
            .take(NAMED_IN_RULE)
            .map(|mut f| {
                f.v2_sample = self.fields[&f.path].v2_sample.clone();
                f
            })
            .collect()
    }
}

fn sample(answer: &AnswerFields, key: &str) -> Option<ValuePair> {
    let p = answer.paths.iter().find(|p| p.path == key)?;
    Some(ValuePair {
        v1: p.v1.clone(),
        copy: p.copy.clone(),
    })
}

/// The fields of a rule: `items[].price (v2 100.0%, control 0.0% of jobs; 12.5 -> 13.0)`.
fn blamed_text(fields: &[FieldReport]) -> String {
    let value = |v: &Option<String>| v.clone().unwrap_or_else(|| "absent".to_string());
    if fields.is_empty() {
        return "none stands out alone".to_string();
    }
    fields
        .iter()
        .map(|f| {
            let mut text = format!("{} (v2 {:.1}%", f.path, f.v2_rate * 100.0);
            if let Some(control) = f.control_rate {
                text.push_str(&format!(", control {:.1}%", control * 100.0));
            }
            text.push_str(" of jobs");
            if let Some(s) = &f.v2_sample {
                text.push_str(&format!("; {} -> {}", value(&s.v1), value(&s.copy)));
            }
            text.push(')');
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Judge {
    /// Feeds one v1-active / v2-simulation pair compared field by field (`compare = "fields"`):
    /// `v2` is where v2's answer differs from the active one, `control` where the A/A control's
    /// answer to the same job does (when a control answered it successfully). From the first
    /// call on, the condition's mismatch test is the field test's aggregate. The caller leaves
    /// out a job whose control copy failed (calling [`Judge::observe`] alone), so both sides of
    /// each statistic are successful answers.
    pub fn observe_with_fields(
        &mut self,
        pair: &PairSample,
        v2: &AnswerFields,
        control: Option<&AnswerFields>,
    ) {
        if self.has_failed() {
            return;
        }
        if self.fields.is_none() {
            // The mismatch test's own share of the false-fail budget, whatever the split.
            let fail_alpha = 1.0 / self.mismatches.test.report().fail_threshold;
            let c = &self.condition;
            let tests = FieldTests::new(
                c.max_mismatch_rate,
                fail_alpha,
                c.false_pass_rate,
                c.false_fail_rate,
            );
            self.fields = Some(tests);
        }
        let judged = self.jobs >= self.condition.warmup_jobs;
        if let (true, Some(_), Some(tests)) = (judged, compared_answers(pair), &mut self.fields) {
            tests.observe(v2, control);
        }
        self.observe(pair);
    }

    /// The field tests, once answers were compared field by field.
    pub fn fields(&self) -> Option<FieldsReport> {
        self.fields.as_ref().map(FieldTests::report)
    }

    /// The test the mismatch rule decides on: the fields' aggregate in fields mode.
    pub(crate) fn mismatch_test(&self) -> &MarginTest {
        match &self.fields {
            Some(fields) => fields.aggregate(),
            None => &self.mismatches.test,
        }
    }

    /// The rule of a failed mismatch test.
    pub(crate) fn mismatch_reason(&self) -> Option<String> {
        let test = self.mismatch_test();
        if test.evidence() != Evidence::Fail {
            return None;
        }
        let report = test.report();
        let evidence = format!(
            "(estimated {:.2}%, evidence {} >= {:.0})",
            report.estimate * 100.0,
            evidence_text(report.fail_evidence),
            report.fail_threshold
        );
        let margin = report.margin * 100.0;
        Some(match &self.fields {
            None => format!(
                "mismatches: v2's answers differ from v1's in more than {margin:.2}% of jobs \
                 {evidence}"
            ),
            Some(fields) => format!(
                "mismatches: v2's answers differ from v1's where the control's do not in more \
                 than {margin:.2}% of jobs {evidence}; fields: {}",
                blamed_text(&fields.blamed())
            ),
        })
    }
}

#[cfg(test)]
#[path = "fields_tests.rs"]
mod tests;
