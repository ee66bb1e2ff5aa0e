//! The judge's field tests as the rollout detail shows them (`fields` of
//! `GET /api/v1/rollouts/{id}`, `compare = "fields"` only).

use serde::{Deserialize, Serialize};
use understudy_judge::{Evidence, FieldClass, FieldReport, FieldsReport, ValuePair};
use utoipa::ToSchema;

/// Every field path where a copy's answer differed from the active one, most differing on
/// v2's side beyond the control first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldsView {
    /// Jobs compared field by field.
    pub jobs: u64,
    /// Of which with the A/A control's answer to subtract.
    pub control_jobs: u64,
    /// At most 64 paths, the rest counted under `(other)`.
    pub fields: Vec<FieldView>,
}

/// One field path: how often v2's and the control's answers differ from v1's there, and its test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FieldView {
    /// `items[].price`, `user.name`, `header:etag`, `(status)`, `(body)`, `(more)`, `(other)`.
    #[schema(example = "items[].price")]
    pub path: String,
    /// Jobs where v2's answer differs from v1's there, and their share.
    pub v2_differs: u64,
    pub v2_rate: f64,
    /// Jobs where the control's answer differs from v1's there, and their share of the jobs
    /// with a control (null without any).
    pub control_differs: u64,
    pub control_rate: Option<f64>,
    /// `regression` (its test shows v2 differing there beyond the control), `noise` (the
    /// control differs there too, never failing), `ok` (its test passed) or `open`.
    #[schema(value_type = String, example = "regression")]
    pub class: FieldClass,
    /// The mean of `[differs for v2] - [differs for the control]` so far, and its
    /// always-valid interval.
    pub estimate: f64,
    pub interval: [f64; 2],
    /// The test's fail and pass e-values (wealths), capped at 1e12.
    pub fail_evidence: f64,
    pub pass_evidence: f64,
    /// `open`, `pass` or `fail`.
    #[schema(value_type = String, example = "fail")]
    pub evidence: Evidence,
    /// The first differing values on v2's side (regressions and noise only).
    pub v2_sample: Option<SampleValues>,
    /// The first differing values on the control's side (regressions and noise only).
    pub control_sample: Option<SampleValues>,
}

/// A sample pair of differing values, as JSON text cut to 80 characters (null: no such field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SampleValues {
    /// The active (v1) answer's value.
    #[schema(example = "12.5")]
    pub v1: Option<String>,
    /// The copy's value (v2's or the control's).
    #[schema(example = "13.0")]
    pub copy: Option<String>,
}

impl FieldsView {
    pub fn of(report: &FieldsReport) -> FieldsView {
        FieldsView {
            jobs: report.jobs,
            control_jobs: report.control_jobs,
            fields: report.fields.iter().map(FieldView::of).collect(),
        }
    }
}

impl FieldView {
    fn of(f: &FieldReport) -> FieldView {
        let sample = |s: &Option<ValuePair>| {
            s.as_ref().map(|s| SampleValues {
                v1: s.v1.clone(),
                copy: s.copy.clone(),
            })
        };
        FieldView {
            path: f.path.clone(),
            v2_differs: f.v2_differs,
            v2_rate: f.v2_rate,
            control_differs: f.control_differs,
            control_rate: f.control_rate,
            class: f.class,
            estimate: f.test.estimate,
            interval: f.test.interval,
            fail_evidence: f.test.fail_evidence,
            pass_evidence: f.test.pass_evidence,
            evidence: f.test.evidence,
            v2_sample: sample(&f.v2_sample),
            control_sample: sample(&f.control_sample),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_judge::{AnswerFields, FieldTests, FieldValues};

    #[test]
    fn a_regressed_field_is_shown_with_its_values_and_its_test() {
        let mut tests = FieldTests::new(0.005, 0.0025, 0.05, 0.01);
        let price = FieldValues {
            path: "items[].price".into(),
            v1: Some("12.5".into()),
            copy: Some("13.0".into()),
        };
        for _ in 0..300 {
            let v2 = AnswerFields {
                paths: vec![price.clone()],
            };
            tests.observe(&v2, Some(&AnswerFields::default()));
        }
        let view = FieldsView::of(&tests.report());
        assert_eq!((view.jobs, view.control_jobs), (300, 300));
        let f = &view.fields[0];
        assert_eq!(
            (f.class, f.evidence),
            (FieldClass::Regression, Evidence::Fail)
        );
        assert_eq!(f.v2_sample.as_ref().unwrap().copy.as_deref(), Some("13.0"));
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["fields"][0]["class"], "regression");
        assert_eq!(json["fields"][0]["control_rate"], 0.0);
        let back: FieldsView = serde_json::from_value(json).unwrap();
        assert_eq!(back, view);
    }
}
