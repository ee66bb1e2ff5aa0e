//! `understudy judge` (offline judging of recorded pairs) and `understudy judge-bench` (the judge's
//! self-test battery). Both use the very `understudy_judge::Judge` the live controller uses.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;
use understudy_judge::bench::{
    run_ablations, run_battery, BatteryConfig, Family, FamilyFigures, PairSource, Recording,
    Variant, VariantFigures,
};
use understudy_judge::{Condition, Decision, Judge, PairSample, Verdict};

#[derive(clap::Args, Debug)]
pub struct JudgeArgs {
    /// CSV of mirrored-job pairs in arrival order: header `v1_latency_us,v1_ok,v2_latency_us,v2_ok`
    /// and optionally `match` (ok and match are 1 or 0).
    pub pairs: PathBuf,
    /// A joining condition in TOML (the fields of a cluster file's `[services.NAME.condition]`
    /// table, at top level or under `[condition]`); default: the built-in default condition.
    #[arg(long, value_name = "FILE")]
    pub condition: Option<PathBuf>,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct JudgeBenchArgs {
    /// Seeded runs per family (A/A and each regression family).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// Write the figures as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Pairs per run at most (a tail-only regression of the slowest 0.2% of jobs needs tens of
    /// thousands of pairs before p99.9 says anything).
    #[arg(long, default_value_t = 120_000)]
    pub budget: u64,
    /// Base seed of the runs.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Worker threads (default: the machine's parallelism).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the pairs come from: the latency model, a replay of A/A pairs recorded through the
    /// real balancer path (`--replay`, default the recordings shipped in bench/data: v2 against the
    /// control and against the active machine), or both.
    #[arg(long, value_enum, default_value_t = BenchSource::Both)]
    pub source: BenchSource,
    /// A/A pairs recorded by `--record` (a pairs CSV) to replay instead of the shipped one.
    #[arg(long, value_name = "PAIRS.csv")]
    pub replay: Option<PathBuf>,
    /// Record A/A pairs through a real balancer into PREFIX-control-pairs.csv and
    /// PREFIX-active-pairs.csv, and exit (see docs/judge.md).
    #[arg(long, value_name = "PREFIX")]
    pub record: Option<PathBuf>,
    /// Run the paired judge alone under each ablation variant (the judge before, each change
    /// alone, all of them) instead of the three judges.
    #[arg(long)]
    pub ablations: bool,
    /// Seconds of load for `--record`.
    #[arg(long, default_value_t = 60.0)]
    pub record_seconds: f64,
    /// Arrivals per second for `--record` (30% are calls of several jobs).
    #[arg(long, default_value_t = 300.0)]
    pub record_rate: f64,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchSource {
    Model,
    Replay,
    Both,
}

/// A/A pairs recorded through the real balancer path by `understudy judge-bench --record
/// bench/data/balancer-aa` (docs/benchmarks.md says how and when): v2 against the control (the
/// live judge's default baseline) and against the active machine.
const SHIPPED_RECORDINGS: [(&str, &str); 2] = [
    (
        "bench/data/balancer-aa-control-pairs.csv",
        include_str!("../../bench/data/balancer-aa-control-pairs.csv"),
    ),
    (
        "bench/data/balancer-aa-active-pairs.csv",
        include_str!("../../bench/data/balancer-aa-active-pairs.csv"),
    ),
];

/// Why a pairs or condition file was refused; the message names the file, line and column.
#[derive(Debug, thiserror::Error)]
pub enum JudgeInputError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Condition { path: String, message: String },
    #[error("{path}: line 1: {message}")]
    Header { path: String, message: String },
    #[error("{path}: line {line}: {message}")]
    Row {
        path: String,
        line: u64,
        message: String,
    },
}

const REQUIRED_COLUMNS: [&str; 4] = ["v1_latency_us", "v1_ok", "v2_latency_us", "v2_ok"];
const MATCH_COLUMN: &str = "match";

/// Column positions of the pairs file, found by name in its header.
#[derive(Debug, Clone, Copy)]
struct Columns {
    v1_latency_us: usize,
    v1_ok: usize,
    v2_latency_us: usize,
    v2_ok: usize,
    matched: Option<usize>,
}

impl Columns {
    fn from_header(header: &csv::StringRecord) -> Result<Columns, String> {
        let mut positions: [Option<usize>; 5] = [None; 5];
        for (index, name) in header.iter().enumerate() {
            let slot = REQUIRED_COLUMNS
                .iter()
                .chain(std::iter::once(&MATCH_COLUMN))
                .position(|known| *known == name)
                .ok_or_else(|| {
                    format!(
                        "column {}: unknown column `{name}` (expected {} and optionally `{MATCH_COLUMN}`)",
                        index + 1,
                        REQUIRED_COLUMNS.join(",")
                    )
                })?;
            if positions[slot].replace(index).is_some() {
                return Err(format!(
                    "column {}: column `{name}` appears twice",
                    index + 1
                ));
            }
        }
        let required = |slot: usize| {
            positions[slot].ok_or_else(|| format!("missing column `{}`", REQUIRED_COLUMNS[slot]))
        };
        Ok(Columns {
            v1_latency_us: required(0)?,
            v1_ok: required(1)?,
            v2_latency_us: required(2)?,
            v2_ok: required(3)?,
            matched: positions[4],
        })
    }

    fn parse(&self, record: &csv::StringRecord) -> Result<PairSample, String> {
        let field = |index: usize, name: &str| {
            record
                .get(index)
                .ok_or_else(|| format!("column {} (`{name}`): missing value", index + 1))
        };
        let latency = |index: usize, name: &str| -> Result<u64, String> {
            let text = field(index, name)?;
            text.parse::<u64>().map_err(|_| {
                format!(
                    "column {} (`{name}`): `{text}` is not a latency in whole microseconds",
                    index + 1
                )
            })
        };
        let flag = |index: usize, name: &str| -> Result<bool, String> {
            match field(index, name)? {
                "1" => Ok(true),
                "0" => Ok(false),
                other => Err(format!(
                    "column {} (`{name}`): expected 1 or 0, found `{other}`",
                    index + 1
                )),
            }
        };
        if record.len() != self.width() {
            return Err(format!(
                "{} fields, the header has {}",
                record.len(),
                self.width()
            ));
        }
        Ok(PairSample {
            v1_latency_us: latency(self.v1_latency_us, "v1_latency_us")?,
            v1_ok: flag(self.v1_ok, "v1_ok")?,
            v2_latency_us: latency(self.v2_latency_us, "v2_latency_us")?,
            v2_ok: flag(self.v2_ok, "v2_ok")?,
            matched: self
                .matched
                .map(|index| flag(index, MATCH_COLUMN))
                .transpose()?,
        })
    }

    fn width(&self) -> usize {
        4 + usize::from(self.matched.is_some())
    }
}

/// A condition file: the condition's fields at top level, or under a `[condition]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrappedCondition {
    condition: Condition,
}

pub fn load_condition(path: &Path) -> Result<Condition, JudgeInputError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| JudgeInputError::Io {
        path: shown.clone(),
        source,
    })?;
    let wrapped = toml::from_str::<toml::Table>(&text)
        .map(|table| table.len() == 1 && table.get("condition").is_some_and(|v| v.is_table()))
        .unwrap_or(false);
    let condition = if wrapped {
        understudy_judge::read_toml::<WrappedCondition>(&text).map(|w| w.condition)
    } else {
        understudy_judge::read_toml::<Condition>(&text)
    }
    .map_err(|e| JudgeInputError::Condition {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    condition
        .validate()
        .map_err(|e| JudgeInputError::Condition {
            path: shown,
            message: e.to_string(),
        })?;
    Ok(condition)
}

/// The outcome of judging a pairs file.
#[derive(Debug, Clone)]
pub struct OfflineVerdict {
    pub verdict: Verdict,
    /// Rows read when the verdict was reached (all rows when it never became final).
    pub jobs_used: u64,
}

/// The rows of a pairs CSV, read one at a time, with errors naming the file, line and column.
pub struct PairRows<R: Read> {
    reader: csv::Reader<R>,
    columns: Columns,
    shown_path: String,
    record: csv::StringRecord,
    rows: u64,
}

impl<R: Read> PairRows<R> {
    pub fn new(reader: R, shown_path: &str) -> Result<PairRows<R>, JudgeInputError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .trim(csv::Trim::All)
            .flexible(true)
            .from_reader(reader);
        let header_error = |message: String| JudgeInputError::Header {
            path: shown_path.to_string(),
            message,
        };
        let header = reader
            .headers()
            .map_err(|e| header_error(e.to_string()))?
            .clone();
        let columns = Columns::from_header(&header).map_err(header_error)?;
        Ok(PairRows {
            reader,
            columns,
            shown_path: shown_path.to_string(),
            record: csv::StringRecord::new(),
            rows: 0,
        })
    }

    /// The next row's pair; `None` at the end of the file.
    pub fn next_pair(&mut self) -> Result<Option<PairSample>, JudgeInputError> {
        let row_error = |line: u64, message: String| JudgeInputError::Row {
            path: self.shown_path.clone(),
            line,
            message,
        };
        let more = self.reader.read_record(&mut self.record).map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(self.rows + 2);
            row_error(line, e.to_string())
        })?;
        if !more {
            return Ok(None);
        }
        let line = self
            .record
            .position()
            .map(|p| p.line())
            .unwrap_or(self.rows + 2);
        let pair = self
            .columns
            .parse(&self.record)
            .map_err(|m| row_error(line, m))?;
        self.rows += 1;
        Ok(Some(pair))
    }

    /// Rows read so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }
}

/// Feeds the rows of a pairs CSV, in order, to one `Judge`, stopping at the first final verdict.
pub fn judge_pairs(
    reader: impl Read,
    shown_path: &str,
    condition: Condition,
) -> Result<OfflineVerdict, JudgeInputError> {
    let mut rows = PairRows::new(reader, shown_path)?;
    let mut judge = Judge::new(condition);
    while let Some(pair) = rows.next_pair()? {
        judge.observe(&pair);
        if judge.is_final() {
            break;
        }
    }
    Ok(OfflineVerdict {
        verdict: judge.verdict(),
        jobs_used: rows.rows(),
    })
}

/// Every pair of a pairs CSV (a recording for `judge-bench --replay`).
pub fn read_all_pairs(
    reader: impl Read,
    shown_path: &str,
) -> Result<Vec<PairSample>, JudgeInputError> {
    let mut rows = PairRows::new(reader, shown_path)?;
    let mut pairs = Vec::new();
    while let Some(pair) = rows.next_pair()? {
        pairs.push(pair);
    }
    Ok(pairs)
}

/// Prints a report; a reader that went away (`| head`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

pub fn judge(args: JudgeArgs) -> u8 {
    match run_judge(&args) {
        Ok(output) => {
            print_out(&output);
            0
        }
        Err(error) => {
            eprintln!("understudy judge: {error}");
            2
        }
    }
}

fn run_judge(args: &JudgeArgs) -> Result<String, JudgeInputError> {
    let condition = match &args.condition {
        Some(path) => load_condition(path)?,
        None => Condition::default(),
    };
    let shown = args.pairs.display().to_string();
    let file = std::fs::File::open(&args.pairs).map_err(|source| JudgeInputError::Io {
        path: shown.clone(),
        source,
    })?;
    let result = judge_pairs(std::io::BufReader::new(file), &shown, condition)?;
    Ok(if args.json {
        let output = JudgeOutput {
            verdict: result.verdict.decision,
            jobs_used: result.jobs_used,
            hard: result.verdict.hard,
            rule: &result.verdict.rule,
            details: &result.verdict.details,
        };
        serde_json::to_string_pretty(&output).expect("verdict serializes")
    } else {
        render_verdict(&result)
    })
}

/// `understudy judge --json` output (CONTRACT.md: at least `verdict` and `jobs_used`).
#[derive(serde::Serialize)]
struct JudgeOutput<'a> {
    verdict: Decision,
    jobs_used: u64,
    hard: bool,
    rule: &'a str,
    details: &'a serde_json::Value,
}

/// Evidence (a wealth) in a table cell: plain when small, scientific when large.
fn evidence_cell(value: f64) -> String {
    if value < 1e4 {
        format!("{value:.3}")
    } else {
        format!("{value:.1e}")
    }
}

/// A number of the verdict's details; NaN when absent (printed as such, never hidden).
fn number(value: &serde_json::Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

fn render_verdict(result: &OfflineVerdict) -> String {
    let verdict = &result.verdict;
    let details = &verdict.details;
    let mut out = format!(
        "verdict: {}{}\njobs used: {}\nrule: {}\n",
        verdict.decision.as_str(),
        if verdict.hard { " (hard)" } else { "" },
        result.jobs_used,
        verdict.rule
    );
    out.push_str(&latency_table(details));
    out.push_str(&shift_line(&details["paired_ratio"]));
    out.push_str(&errors_line(&details["errors"]));
    out.push_str(&mismatches_line(&details["mismatches"]));
    out.push_str(&format!(
        "false-fail rate {} (per test {:.5}), false-pass rate {}",
        details["false_fail_rate"],
        number(&details["per_test_false_fail_rate"]),
        details["false_pass_rate"]
    ));
    out
}

/// The latency table: its header, then one row per percentile, lowest first.
fn latency_table(details: &serde_json::Value) -> String {
    let mut out = format!(
        "\n{:<8} {:>10} {:>10} {:>7} {:>6} {:>16} {:>9} {:>9}\n",
        "latency", "v1 us", "v2 us", "ratio", "limit", "ratio 99% CI", "fail ev", "pass ev"
    );
    if let Some(latency) = details["latency"].as_object() {
        let mut rows: Vec<_> = latency.iter().collect();
        rows.sort_by(|a, b| number(&a.1["quantile"]).total_cmp(&number(&b.1["quantile"])));
        for (name, row) in rows {
            out.push_str(&latency_row(name, row));
        }
    }
    out
}

/// One percentile's row; a percentile not judged yet shows the jobs it still needs instead of
/// its evidence.
fn latency_row(name: &str, row: &serde_json::Value) -> String {
    let judged = row["judged"].as_bool().unwrap_or(false);
    format!(
        "{:<8} {:>10.0} {:>10.0} {:>7.3} {:>6.2} {:>7.3}..{:<7.3} {:>9} {:>9}\n",
        name,
        number(&row["v1_us"]),
        number(&row["v2_us"]),
        number(&row["ratio"]),
        number(&row["max_ratio"]),
        number(&row["ratio_interval"][0]),
        number(&row["ratio_interval"][1]),
        if judged {
            evidence_cell(number(&row["test"]["fail_evidence"]))
        } else {
            "-".to_string()
        },
        if judged {
            evidence_cell(number(&row["test"]["pass_evidence"]))
        } else {
            format!("<{}", row["floor_jobs"])
        },
    )
}

/// The per-job ratio line; empty when the verdict has no paired-ratio test.
fn shift_line(paired: &serde_json::Value) -> String {
    if !paired.is_object() {
        return String::new();
    }
    format!(
        "{:<8} per-job ratio v2/v1: p10 {:.3}, median {:.3} (limit {:.2}), p90 {:.3}; \
         fail ev {}, pass ev {}\n",
        "shift",
        number(&paired["p10"]),
        number(&paired["p50"]),
        number(&paired["max_ratio"]),
        number(&paired["p90"]),
        evidence_cell(number(&paired["test"]["fail_evidence"])),
        evidence_cell(number(&paired["test"]["pass_evidence"])),
    )
}

fn errors_line(errors: &serde_json::Value) -> String {
    format!(
        "\nerrors: v1 {:.3}%  v2 {:.3}%  (v1 ok/v2 error {}, v1 error/v2 ok {})  increase {:.3} points, \
         interval {:.3}..{:.3}, margin {:.3}\n",
        number(&errors["v1_rate"]) * 100.0,
        number(&errors["v2_rate"]) * 100.0,
        errors["v1_ok_v2_error"],
        errors["v1_error_v2_ok"],
        number(&errors["increase"]["estimate"]) * 100.0,
        number(&errors["increase"]["interval"][0]) * 100.0,
        number(&errors["increase"]["interval"][1]) * 100.0,
        number(&errors["increase"]["margin"]) * 100.0,
    )
}

fn mismatches_line(mismatches: &serde_json::Value) -> String {
    format!(
        "mismatches: {} of {} compared ({:.3}%), margin {:.3}%\n",
        mismatches["mismatched"],
        mismatches["compared"],
        number(&mismatches["rate"]) * 100.0,
        number(&mismatches["test"]["margin"]) * 100.0,
    )
}

pub fn judge_bench(args: JudgeBenchArgs) -> u8 {
    if let Some(path) = &args.record {
        return record(path, &args);
    }
    let sources = match bench_sources(&args) {
        Ok(sources) => sources,
        Err(error) => {
            eprintln!("understudy judge-bench: {error}");
            return 2;
        }
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut reports = Vec::new();
    for (source, origin) in sources {
        let config = BatteryConfig {
            runs: args.runs.max(1),
            budget_jobs: args.budget.max(1),
            seed: args.seed,
            source,
            ..BatteryConfig::default()
        };
        let started = Instant::now();
        if args.ablations {
            let variants = Variant::ablations();
            let figures = run_ablations(&config, &Family::ALL, &variants, threads);
            print_out(&render_ablations(&origin, &figures));
            reports.push(serde_json::json!({"origin": origin, "ablations": figures}));
            continue;
        }
        let figures = run_battery(&config, &Family::ALL, threads);
        let elapsed = started.elapsed().as_secs_f64();
        print_out(&render_bench(&config, &origin, &figures, elapsed));
        reports.push(serde_json::json!({
            "source": config.source.name(),
            "origin": origin,
            "runs_per_family": config.runs,
            "budget_jobs": config.budget_jobs,
            "seed": config.seed,
            "seconds": elapsed,
            "condition": config.condition,
            "families": figures,
        }));
    }
    // The rule `prediction` on seeded calls (predict/src/bench.rs): its test and the old z-rule.
    if !args.ablations {
        use understudy_predict::bench;
        let config = bench::BenchConfig {
            runs: args.runs.max(1),
            seed: args.seed,
            ..bench::BenchConfig::default()
        };
        let started = Instant::now();
        let figures = bench::run_battery(&config);
        let elapsed = started.elapsed().as_secs_f64();
        print_out(&bench::render(&config, &figures, elapsed));
        reports.push(serde_json::json!({
            "source": "prediction", "seconds": elapsed, "config": config, "families": figures,
        }));
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "batteries": reports });
        let text = serde_json::to_string_pretty(&json).expect("figures serialize");
        if let Err(error) = std::fs::write(path, text) {
            eprintln!("understudy judge-bench: {}: {error}", path.display());
            return 2;
        }
    }
    0
}

/// The ablation table: one row per variant and family.
fn render_ablations(origin: &str, figures: &[VariantFigures]) -> String {
    let mut out = format!(
        "\nAblations, paired judge, {origin}\n\n| family | variant | fails | passes | undecided | undecided at 20k | median jobs | p90 jobs |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    let families: Vec<Family> = figures
        .first()
        .map(|v| v.families.iter().map(|(f, _)| *f).collect())
        .unwrap_or_default();
    let jobs = |value: Option<u64>| value.map_or("-".to_string(), |j| j.to_string());
    for family in families {
        for variant in figures {
            let Some((_, f)) = variant.families.iter().find(|(fam, _)| *fam == family) else {
                continue;
            };
            out.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} | {} | {} |\n",
                family.name(),
                variant.variant,
                f.fails,
                f.runs,
                f.passes,
                f.undecided,
                f.undecided_at_20k,
                jobs(f.median_jobs),
                jobs(f.p90_jobs)
            ));
        }
    }
    out
}

/// The batteries to run, each with where its pairs came from.
fn bench_sources(args: &JudgeBenchArgs) -> Result<Vec<(PairSource, String)>, String> {
    let mut sources = Vec::new();
    if args.source != BenchSource::Replay {
        sources.push((
            PairSource::Model(Default::default()),
            "seeded latency model".to_string(),
        ));
    }
    if args.source == BenchSource::Model {
        return Ok(sources);
    }
    let recordings = match &args.replay {
        Some(path) => {
            let shown = path.display().to_string();
            let file = std::fs::File::open(path).map_err(|e| format!("{shown}: {e}"))?;
            vec![(
                read_all_pairs(std::io::BufReader::new(file), &shown).map_err(|e| e.to_string())?,
                shown,
            )]
        }
        None => SHIPPED_RECORDINGS
            .iter()
            .map(|(path, text)| {
                read_all_pairs(text.as_bytes(), path)
                    .map(|pairs| (pairs, path.to_string()))
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?,
    };
    for (pairs, origin) in recordings {
        let count = pairs.len();
        let recording = Recording::new(pairs).map_err(|e| format!("{origin}: {e}"))?;
        sources.push((
            PairSource::Replay(std::sync::Arc::new(recording)),
            format!("{origin}, {count} recorded pairs"),
        ));
    }
    Ok(sources)
}

fn record(path: &Path, args: &JudgeBenchArgs) -> u8 {
    for (flag, value) in [
        ("--record-seconds", args.record_seconds),
        ("--record-rate", args.record_rate),
    ] {
        if !(value.is_finite() && value > 0.0) {
            eprintln!("understudy judge-bench: {flag}: {value} is not a positive number");
            return 2;
        }
    }
    let plan = crate::offline::record::RecordPlan {
        rate: args.record_rate,
        duration_s: args.record_seconds,
        seed: args.seed,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("understudy judge-bench: runtime: {error}");
            return 2;
        }
    };
    match runtime.block_on(crate::offline::record::record_to(path, &plan)) {
        Ok((files, count)) => {
            println!(
                "recorded {count} A/A jobs through the balancer into {}",
                files.join(" and ")
            );
            0
        }
        Err(error) => {
            eprintln!("understudy judge-bench --record: {error}");
            1
        }
    }
}

fn render_bench(
    config: &BatteryConfig,
    origin: &str,
    figures: &[FamilyFigures],
    seconds: f64,
) -> String {
    let jobs = |value: Option<u64>| value.map_or("-".to_string(), |v| v.to_string());
    let mut out = format!(
        "judge-bench, pairs from the {} ({origin}): {} runs per family, at most {} pairs per run, seed {}, {:.1} s\n\
         fails = rollbacks (false rollbacks for A/A and at the limit, detections otherwise); jobs = \
         pairs fed until the right decision (pass for A/A, fail for a regression)\n\n\
         | family | judge | fails | passes | undecided | median jobs | p90 jobs |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: |\n",
        config.source.name(),
        config.runs,
        config.budget_jobs,
        config.seed,
        seconds,
    );
    for family in figures {
        for (judge, f) in [
            ("paired sequential", &family.paired),
            ("unpaired Mann-Whitney", &family.unpaired),
            ("paired, pairing broken", &family.pairing_broken),
        ] {
            out.push_str(&format!(
                "| {} | {} | {}/{} | {} | {} | {} | {} |\n",
                family.name,
                judge,
                f.fails,
                f.runs,
                f.passes,
                f.undecided,
                jobs(f.median_jobs),
                jobs(f.p90_jobs)
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge_text(text: &str) -> Result<OfflineVerdict, JudgeInputError> {
        judge_pairs(text.as_bytes(), "pairs.csv", Condition::default())
    }

    #[test]
    fn bad_cells_name_the_line_and_column() {
        let text = "v1_latency_us,v1_ok,v2_latency_us,v2_ok\n1000,1,1100,1\n1000,yes,1100,1\n";
        let message = judge_text(text).unwrap_err().to_string();
        assert!(message.contains("pairs.csv: line 3"), "{message}");
        assert!(message.contains("column 2 (`v1_ok`)"), "{message}");
        let text = "v1_latency_us,v1_ok,v2_latency_us,v2_ok,match\n1000,1,-5,1,1\n";
        let message = judge_text(text).unwrap_err().to_string();
        assert!(
            message.contains("line 2") && message.contains("v2_latency_us"),
            "{message}"
        );
        let text = "v1_latency_us,v1_ok,v2_latency_us,v2_ok\n1000,1,1100\n";
        let message = judge_text(text).unwrap_err().to_string();
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn bad_headers_are_refused_by_name() {
        let message = judge_text("v1_latency_us,v1_ok,v2_latency,v2_ok\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 1") && message.contains("`v2_latency`"),
            "{message}"
        );
        let message = judge_text("v1_latency_us,v1_ok,v2_ok\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("missing column `v2_latency_us`"),
            "{message}"
        );
    }

    #[test]
    fn stops_at_the_first_final_verdict() {
        let mut text = String::from("v2_ok,v2_latency_us,v1_ok,v1_latency_us,match\n");
        for row in 0..20_000 {
            // v2 fails every other job: a hard failure soon after warm-up and the minimum.
            text.push_str(&format!("{},1000,1,1000,1\n", row % 2));
        }
        let result = judge_text(&text).unwrap();
        assert_eq!(result.verdict.decision, Decision::Fail);
        assert!(result.verdict.hard);
        assert!(result.jobs_used < 1_000, "{}", result.jobs_used);
        assert_eq!(result.jobs_used, result.verdict.jobs);
    }

    #[test]
    fn short_file_is_not_enough_data_with_all_rows_used() {
        let mut text = String::from("v1_latency_us,v1_ok,v2_latency_us,v2_ok\n");
        for _ in 0..100 {
            text.push_str("1000,1,5000,0\n");
        }
        let result = judge_text(&text).unwrap();
        assert_eq!(result.verdict.decision, Decision::NotEnoughData);
        assert_eq!(result.jobs_used, 100);
    }

    #[test]
    fn condition_files_take_both_forms_and_name_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let flat = dir.path().join("flat.toml");
        std::fs::write(&flat, "min_jobs = 50\nwarmup_jobs = 0\n").unwrap();
        assert_eq!(load_condition(&flat).unwrap().min_jobs, 50);
        let wrapped = dir.path().join("wrapped.toml");
        std::fs::write(&wrapped, "[condition]\nmin_jobs = 70\n").unwrap();
        assert_eq!(load_condition(&wrapped).unwrap().min_jobs, 70);
        let unknown = dir.path().join("unknown.toml");
        std::fs::write(&unknown, "min_jobs = 50\nmax_ratio = 2\n").unwrap();
        let message = load_condition(&unknown).unwrap_err().to_string();
        assert!(
            message.contains("max_ratio") && message.contains("line 2"),
            "{message}"
        );
        let invalid = dir.path().join("invalid.toml");
        std::fs::write(&invalid, "false_fail_rate = 2.0\n").unwrap();
        let message = load_condition(&invalid).unwrap_err().to_string();
        assert!(message.contains("false_fail_rate"), "{message}");
    }
}
