//! `understudy predictions`: the live predictive models, their comparison and recent alerts, read
//! from the admin endpoint and printed as tables.

use crate::cli::error::CliResult;

#[derive(clap::Args, Debug)]
pub struct PredictionsArgs {
    /// Only this service.
    pub service: Option<String>,
    /// Only this version of the service: one table per configuration, state by state.
    pub version: Option<String>,
    /// The recent alerts instead of the models.
    #[arg(long, conflicts_with = "version")]
    pub alerts: bool,
    /// Print the endpoint's JSON answer.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub endpoint: crate::cli::EndpointArgs,
}

fn number(value: &serde_json::Value, digits: usize) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// One row per model, then the v2-against-v1 comparisons.
pub(crate) fn models_text(view: &serde_json::Value) -> String {
    let mut rows = vec![[
        "service",
        "version",
        "config",
        "P(failure) from start",
        "starts",
        "states",
    ]
    .map(String::from)
    .to_vec()];
    let start = view["start_state"].as_str().unwrap_or("");
    for m in view["models"].as_array().into_iter().flatten() {
        rows.push(vec![
            m["service"].as_str().unwrap_or("").to_string(),
            m["version"].as_str().unwrap_or("").to_string(),
            m["config"].as_str().unwrap_or("").to_string(),
            number(&m["start_failure"], 4),
            number(&m["outlook"]["states"][start]["exits"], 1),
            m["outlook"]["order"]
                .as_array()
                .map_or(0, Vec::len)
                .to_string(),
        ]);
    }
    let mut out = format!(
        "MODELS (start state `{start}`)\n{}",
        crate::table::render(&rows)
    );
    let mut rows = vec![[
        "service",
        "v1 (active)",
        "v2 (simulation)",
        "P1",
        "P2",
        "z",
        "clearly higher",
    ]
    .map(String::from)
    .to_vec()];
    for c in view["comparisons"].as_array().into_iter().flatten() {
        let n = &c["comparison"];
        rows.push(vec![
            c["service"].as_str().unwrap_or("").to_string(),
            c["baseline"]["version"].as_str().unwrap_or("").to_string(),
            c["candidate"]["version"].as_str().unwrap_or("").to_string(),
            number(&n["baseline"]["failure"], 4),
            number(&n["candidate"]["failure"], 4),
            number(&n["z"], 2),
            n["clearly_higher"].as_bool().unwrap_or(false).to_string(),
        ]);
    }
    out.push_str(&format!("COMPARISONS\n{}", crate::table::render(&rows)));
    out
}

/// State by state: departures, P(each artifact), mean and p99 dwell.
pub(crate) fn states_text(view: &serde_json::Value) -> String {
    let artifacts: Vec<String> = view["artifacts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    let mut out = String::new();
    for m in view["models"].as_array().into_iter().flatten() {
        let mut header = vec![
            "state".to_string(),
            "role".to_string(),
            "departures".to_string(),
        ];
        header.extend(artifacts.iter().map(|a| format!("P({a})")));
        header.extend(["mean dwell s".to_string(), "p99 dwell s".to_string()]);
        let mut rows = vec![header];
        for state in m["outlook"]["order"].as_array().into_iter().flatten() {
            let name = state.as_str().unwrap_or("");
            let s = &m["outlook"]["states"][name];
            let dwell = &m["dwell"][name];
            let mut row = vec![
                name.to_string(),
                s["role"].as_str().unwrap_or("").to_string(),
                number(&s["exits"], 1),
            ];
            row.extend(artifacts.iter().map(|a| number(&s["artifacts"][a], 4)));
            row.extend([
                number(&dwell["mean_secs"], 3),
                number(&dwell["p99_secs"], 3),
            ]);
            rows.push(row);
        }
        out.push_str(&format!(
            "{} {} ({})\n{}",
            m["service"].as_str().unwrap_or(""),
            m["version"].as_str().unwrap_or(""),
            m["config"].as_str().unwrap_or(""),
            crate::table::render(&rows)
        ));
    }
    out
}

pub(crate) fn alerts_text(answer: &serde_json::Value) -> String {
    let mut rows = vec![[
        "at_ms", "service", "version", "config", "object", "state", "artifact", "P", "cause",
    ]
    .map(String::from)
    .to_vec()];
    for a in answer["alerts"].as_array().into_iter().flatten() {
        let text = |key: &str| a[key].as_str().unwrap_or("").to_string();
        rows.push(vec![
            a["at_ms"].to_string(),
            text("service"),
            text("version"),
            text("config"),
            text("object"),
            text("state"),
            text("artifact"),
            number(&a["probability"], 4),
            text("cause"),
        ]);
    }
    format!(
        "ALERTS ({} raised in all)\n{}",
        answer["alerts_total"],
        crate::table::render(&rows)
    )
}

/// `understudy predictions`: 0 shown, 1 refused or unreachable, 2 bad use.
pub fn predictions_command(args: PredictionsArgs) -> CliResult {
    let client = crate::cli::admin(&args.endpoint)?;
    let rt = crate::cli::runtime()?;
    let path = match (&args.service, &args.version, args.alerts) {
        (service, _, true) => format!(
            "/api/v1/predictions/alerts{}",
            service
                .as_ref()
                .map_or(String::new(), |s| format!("?service={s}"))
        ),
        (Some(service), Some(version), false) => format!("/api/v1/predictions/{service}/{version}"),
        (Some(service), None, false) => format!("/api/v1/predictions/{service}"),
        (None, _, false) => "/api/v1/predictions".to_string(),
    };
    let answer: serde_json::Value = rt.block_on(client.get(&path))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    } else if args.alerts {
        print!("{}", alerts_text(&answer));
    } else if args.version.is_some() {
        print!("{}", states_text(&answer));
    } else {
        print!("{}", models_text(&answer));
    }
    Ok(())
}
