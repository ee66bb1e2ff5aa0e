//! `understudy predict TABLE.csv`: the probability of eventually ending in each artifact (failure)
//! state, from a table of observed transition counts, solved by the same absorbing chain the live
//! predictor uses (`understudy_predict::solve`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;

use understudy_predict::{solve, Absorbing, Outlook, TransitionTable};

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// CSV of observed transition counts: header `from,to,count`, one row per observed pair of
    /// states (states named freely; counts are non-negative numbers).
    pub table: PathBuf,
    /// The artifact (failure) states, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "error state failure,time threshold failure"
    )]
    pub artifacts: Vec<String>,
    /// Print `{ STATE: { ARTIFACT: probability } }` as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Why a table (or the artifact list) was refused; the message names the line and column.
#[derive(Debug, thiserror::Error)]
pub enum PredictInputError {
    #[error("--artifacts: {0}")]
    Artifacts(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    Line {
        path: String,
        line: u64,
        message: String,
    },
    #[error("{path}: line {line}, column {column} (`{name}`): {message}")]
    Field {
        path: String,
        line: u64,
        column: usize,
        name: &'static str,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

const COLUMNS: [&str; 3] = ["from", "to", "count"];

/// The artifact list, checked: no empty names, no repeats.
pub fn parse_artifacts(names: &[String]) -> Result<Vec<String>, PredictInputError> {
    let mut artifacts: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let name = name.trim();
        if name.is_empty() {
            return Err(PredictInputError::Artifacts(format!(
                "artifact {} is an empty name",
                i + 1
            )));
        }
        if artifacts.iter().any(|known| known == name) {
            return Err(PredictInputError::Artifacts(format!(
                "`{name}` is listed twice"
            )));
        }
        artifacts.push(name.to_string());
    }
    if artifacts.is_empty() {
        return Err(PredictInputError::Artifacts(
            "name at least one artifact state".to_string(),
        ));
    }
    Ok(artifacts)
}

/// Reads a `from,to,count` table. Columns may come in any order; every row must be complete, each
/// pair appears once, and artifacts (which end an object's life) have no outgoing rows.
pub fn read_table(
    reader: impl Read,
    shown_path: &str,
    artifacts: &[String],
) -> Result<TransitionTable, PredictInputError> {
    let mut csv_reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .flexible(true)
        .from_reader(reader);
    let errors = TableErrors { path: shown_path };
    let header = csv_reader
        .headers()
        .map_err(|e| errors.line(1, e.to_string()))?
        .clone();
    let columns = column_positions(&header, &errors)?;

    let mut table = TransitionTable::new();
    let mut seen: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut record = csv::StringRecord::new();
    let mut rows = 0u64;
    loop {
        let more = csv_reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(rows + 2);
            errors.line(line, e.to_string())
        })?;
        if !more {
            break;
        }
        rows += 1;
        let line = record.position().map(|p| p.line()).unwrap_or(rows + 1);
        let row = RowReader {
            record: &record,
            line,
            columns: &columns,
            errors: &errors,
        };
        let Some((from, to, count)) = row.transition(artifacts)? else {
            continue; // a blank line
        };
        let pair = (from.to_string(), to.to_string());
        if let Some(first) = seen.insert(pair, line) {
            return Err(errors.line(
                line,
                format!("the pair `{from}` -> `{to}` was already given on line {first}"),
            ));
        }
        table.add(from, to, count);
    }
    if seen.is_empty() {
        return Err(errors.file("no transitions after the header"));
    }
    Ok(table)
}

/// Builds the errors of one table, each naming its file.
struct TableErrors<'a> {
    path: &'a str,
}

impl TableErrors<'_> {
    fn line(&self, line: u64, message: String) -> PredictInputError {
        PredictInputError::Line {
            path: self.path.to_string(),
            line,
            message,
        }
    }

    fn file(&self, message: &str) -> PredictInputError {
        PredictInputError::File {
            path: self.path.to_string(),
            message: message.to_string(),
        }
    }
}

/// The CSV column of each of `COLUMNS` (`[from, to, count]`), from the header: every column
/// known, none twice, none missing.
fn column_positions(
    header: &csv::StringRecord,
    errors: &TableErrors<'_>,
) -> Result<[usize; 3], PredictInputError> {
    if header.iter().all(str::is_empty) {
        return Err(errors.file("empty file: expected the header `from,to,count`"));
    }
    // positions[k] is the CSV column holding COLUMNS[k].
    let mut positions = [None; 3];
    for (index, name) in header.iter().enumerate() {
        let Some(slot) = COLUMNS.iter().position(|known| *known == name) else {
            return Err(errors.line(
                1,
                format!(
                    "column {}: unknown column `{name}` (expected `from,to,count`)",
                    index + 1
                ),
            ));
        };
        if positions[slot].replace(index).is_some() {
            return Err(errors.line(
                1,
                format!("column {}: column `{name}` appears twice", index + 1),
            ));
        }
    }
    let mut columns = [0usize; 3];
    for (slot, position) in positions.iter().enumerate() {
        columns[slot] = position
            .ok_or_else(|| errors.line(1, format!("missing column `{}`", COLUMNS[slot])))?;
    }
    Ok(columns)
}

/// One data row of the table, read through the header's column positions.
struct RowReader<'r> {
    record: &'r csv::StringRecord,
    line: u64,
    columns: &'r [usize; 3],
    errors: &'r TableErrors<'r>,
}

impl<'r> RowReader<'r> {
    /// The row's transition `(from, to, count)`, checked; `None` for a blank line.
    fn transition(
        &self,
        artifacts: &[String],
    ) -> Result<Option<(&'r str, &'r str, f64)>, PredictInputError> {
        let record = self.record;
        if record.len() == 1 && record.get(0) == Some("") {
            return Ok(None);
        }
        if record.len() > COLUMNS.len() {
            return Err(self.errors.line(
                self.line,
                format!(
                    "column {}: unexpected extra field `{}` (the header has 3 columns)",
                    COLUMNS.len() + 1,
                    &record[COLUMNS.len()]
                ),
            ));
        }
        let from = self.state(0)?;
        let to = self.state(1)?;
        let count = self.count()?;
        if artifacts.iter().any(|a| a == from) {
            return Err(self.field_error(
                0,
                format!("`{from}` is an artifact: it ends an object's life, nothing leaves it"),
            ));
        }
        Ok(Some((from, to, count)))
    }

    /// The state name in column `slot` (`from` or `to`).
    fn state(&self, slot: usize) -> Result<&'r str, PredictInputError> {
        match self.record.get(self.columns[slot]) {
            None => Err(self.field_error(slot, "missing".to_string())),
            Some("") => Err(self.field_error(slot, "a state name cannot be empty".to_string())),
            Some(name) => Ok(name),
        }
    }

    /// The `count` field: a finite, non-negative number.
    fn count(&self) -> Result<f64, PredictInputError> {
        let count_text = self
            .record
            .get(self.columns[2])
            .ok_or_else(|| self.field_error(2, "missing".to_string()))?;
        count_text
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite() && *c >= 0.0)
            .ok_or_else(|| {
                self.field_error(
                    2,
                    format!("`{count_text}` is not a count (a non-negative number)"),
                )
            })
    }

    fn field_error(&self, slot: usize, message: String) -> PredictInputError {
        PredictInputError::Field {
            path: self.errors.path.to_string(),
            line: self.line,
            column: self.columns[slot] + 1,
            name: COLUMNS[slot],
            message,
        }
    }
}

/// Solves the table. A state nothing leaves that is not an artifact is where objects ended well:
/// the table is a complete history, so it is a success rather than an unknown.
pub fn predictions(table: &TransitionTable, artifacts: &[String]) -> Outlook {
    let successes: BTreeSet<String> = table
        .states()
        .iter()
        .filter(|s| table.exits(s) == 0.0 && !artifacts.contains(s))
        .cloned()
        .collect();
    let absorbing = Absorbing {
        artifacts: artifacts.to_vec(),
        successes,
    };
    solve(table, &absorbing, &BTreeMap::new())
}

/// `{ STATE: { ARTIFACT: probability } }`.
pub fn render_json(outlook: &Outlook) -> String {
    let json: serde_json::Map<String, serde_json::Value> = outlook
        .order
        .iter()
        .map(|state| {
            let row: serde_json::Map<String, serde_json::Value> = outlook
                .artifacts
                .iter()
                .map(|artifact| {
                    let p = outlook.probability(state, artifact).unwrap_or(0.0);
                    (artifact.clone(), serde_json::json!(p))
                })
                .collect();
            (state.clone(), serde_json::Value::Object(row))
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::Value::Object(json)).expect("numbers serialize")
}

/// One row per state (in the order the table names them): the probability of each artifact, the
/// observed departures, and the expected transitions until the object ends.
pub fn render_table(outlook: &Outlook) -> String {
    let mut rows = vec![std::iter::once("state".to_string())
        .chain(outlook.artifacts.iter().map(|a| format!("P({a})")))
        .chain(["departures".to_string(), "steps to end".to_string()])
        .collect::<Vec<_>>()];
    let mut never_ends = Vec::new();
    for state in &outlook.order {
        let Some(stay) = outlook.state(state) else {
            continue;
        };
        let mut row = vec![state.clone()];
        row.extend(
            outlook
                .artifacts
                .iter()
                .map(|a| format!("{:.6}", stay.artifacts.get(a).copied().unwrap_or(0.0))),
        );
        row.push(format!("{}", stay.exits));
        row.push(match stay.expected_steps {
            Some(steps) => format!("{steps:.3}"),
            None => {
                never_ends.push(state.clone());
                "never ends".to_string()
            }
        });
        rows.push(row);
    }
    let mut out = crate::table::render(&rows);
    if !never_ends.is_empty() {
        out.push_str(&format!(
            "\nnever ends: objects in {} may enter a cycle nothing was seen leaving\n",
            never_ends.join(", ")
        ));
    }
    out
}

pub fn predict(args: PredictArgs) -> u8 {
    match run(&args) {
        Ok(output) => {
            print!("{output}");
            0
        }
        Err(error) => {
            eprintln!("understudy predict: {error}");
            2
        }
    }
}

fn run(args: &PredictArgs) -> Result<String, PredictInputError> {
    let artifacts = parse_artifacts(&args.artifacts)?;
    let shown = args.table.display().to_string();
    let file = std::fs::File::open(&args.table).map_err(|source| PredictInputError::Io {
        path: shown.clone(),
        source,
    })?;
    let table = read_table(std::io::BufReader::new(file), &shown, &artifacts)?;
    let outlook = predictions(&table, &artifacts);
    Ok(if args.json {
        format!("{}\n", render_json(&outlook))
    } else {
        render_table(&outlook)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use understudy_predict::{ERROR_STATE_FAILURE, TIME_THRESHOLD_FAILURE};

    const WORKED_EXAMPLE: &str = "from,to,count
API request,5XX response,1
API request,server-side exception,2
API request,process start,97
process start,X,97
X,Y,30
X,Z,67
Y,F,10
Y,complete,17
Y,error state failure,3
Z,complete,67
F,complete,6
F,time threshold failure,4
";

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: PredictArgs,
    }

    fn default_artifacts() -> Vec<String> {
        vec![
            ERROR_STATE_FAILURE.to_string(),
            TIME_THRESHOLD_FAILURE.to_string(),
        ]
    }

    fn read(text: &str) -> Result<TransitionTable, PredictInputError> {
        read_table(text.as_bytes(), "t.csv", &default_artifacts())
    }

    fn refused(text: &str) -> String {
        read(text).unwrap_err().to_string()
    }

    #[test]
    fn arguments_default_to_the_two_artifacts() {
        let cli = TestCli::parse_from(["predict", "t.csv"]);
        assert_eq!(cli.args.artifacts, default_artifacts());
        assert!(!cli.args.json);
        let cli = TestCli::parse_from(["predict", "t.csv", "--artifacts", "crash,hang", "--json"]);
        assert_eq!(cli.args.artifacts, ["crash", "hang"]);
        assert!(cli.args.json);
        assert!(parse_artifacts(&["a".into(), " ".into()])
            .unwrap_err()
            .to_string()
            .contains("artifact 2"));
        assert!(parse_artifacts(&["a".into(), "a".into()]).is_err());
    }

    #[test]
    fn worked_example_as_json() {
        let outlook = predictions(&read(WORKED_EXAMPLE).unwrap(), &default_artifacts());
        let json: serde_json::Value = serde_json::from_str(&render_json(&outlook)).unwrap();
        let p = |state: &str, artifact: &str| json[state][artifact].as_f64().unwrap();
        assert!((p("Y", "error state failure") - 0.10).abs() < 1e-12);
        assert!((p("F", "time threshold failure") - 0.40).abs() < 1e-12);
        assert!((p("API request", "error state failure") - 0.03).abs() < 1e-12);
        assert!((p("API request", "time threshold failure") - 0.04).abs() < 1e-12);
        assert_eq!(p("Z", "error state failure"), 0.0);
        assert_eq!(p("complete", "time threshold failure"), 0.0);
        assert_eq!(p("error state failure", "error state failure"), 1.0);
        assert_eq!(json.as_object().unwrap().len(), 11);
        assert_eq!(json["Y"].as_object().unwrap().len(), 2);
    }

    #[test]
    fn worked_example_as_a_table() {
        let outlook = predictions(&read(WORKED_EXAMPLE).unwrap(), &default_artifacts());
        let text = render_table(&outlook);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("state"), "{text}");
        assert!(lines[0].contains("P(error state failure)"), "{text}");
        assert!(lines[1].starts_with("API request"), "{text}");
        let y = lines.iter().find(|l| l.starts_with("Y ")).unwrap();
        assert!(y.contains("0.100000") && y.contains("0.133333"), "{y}");
        let f = lines.iter().find(|l| l.starts_with("F ")).unwrap();
        assert!(f.contains("0.400000"), "{f}");
    }

    #[test]
    fn custom_artifacts_and_columns_in_any_order() {
        let text = "count,to,from\n3,crash,a\n1,ok,a\n";
        let artifacts = vec!["crash".to_string()];
        let table = read_table(text.as_bytes(), "t.csv", &artifacts).unwrap();
        let outlook = predictions(&table, &artifacts);
        assert_eq!(outlook.probability("a", "crash"), Some(0.75));
    }

    #[test]
    fn cycles_that_never_end_are_reported() {
        let table = read("from,to,count\na,b,1\nb,a,1\n").unwrap();
        let text = render_table(&predictions(&table, &default_artifacts()));
        assert!(text.contains("never ends: objects in a, b"), "{text}");
    }

    #[test]
    fn bad_files_name_the_line_and_column() {
        assert_eq!(
            refused("from,to,count\na,b,1\na,c,many\n"),
            "t.csv: line 3, column 3 (`count`): `many` is not a count (a non-negative number)"
        );
        assert!(refused("from,to,count\na,b,-1\n").contains("line 2, column 3 (`count`)"));
        assert!(refused("from,to,count\na,b,NaN\n").contains("line 2, column 3"));
        assert_eq!(
            refused("from,to,count\na,,1\n"),
            "t.csv: line 2, column 2 (`to`): a state name cannot be empty"
        );
        assert_eq!(
            refused("from,to,count\na,b\n"),
            "t.csv: line 2, column 3 (`count`): missing"
        );
        assert!(refused("from,to,count\na,b,1,2\n").contains("line 2: column 4: unexpected extra"));
        assert_eq!(
            refused("from,to,weight\n"),
            "t.csv: line 1: column 3: unknown column `weight` (expected `from,to,count`)"
        );
        assert!(refused("from,to\n").contains("line 1: missing column `count`"));
        assert!(
            refused("from,from,count\n").contains("line 1: column 2: column `from` appears twice")
        );
        assert!(refused("from,to,count\na,b,1\nc,d,1\na,b,2\n")
            .contains("line 4: the pair `a` -> `b` was already given on line 2"));
        assert!(refused("from,to,count\nerror state failure,b,1\n")
            .contains("line 2, column 1 (`from`): `error state failure` is an artifact"));
        assert!(refused("from,to,count\n").contains("no transitions"));
        assert!(refused("").contains("empty file"));
        assert!(refused("from,to,count\na,\"b,1\n").contains("t.csv: line"));
    }

    #[test]
    fn missing_file_is_a_bad_file() {
        let code = predict(PredictArgs {
            table: PathBuf::from("/nonexistent/table.csv"),
            artifacts: default_artifacts(),
            json: false,
        });
        assert_eq!(code, 2);
    }
}
