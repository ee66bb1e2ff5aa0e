//! The absorbing Markov chain: from transition counts, the probability that an object in each state
//! eventually ends in each artifact (failure) state, and the expected number of steps until it ends.
//!
//! With Q the transitions among transient states and R those into absorbing ones, the absorption
//! probabilities B solve (I - Q) B = R; the expected steps t solve (I - Q) t = 1. Both are solved at
//! once by Gaussian elimination with partial pivoting (the chains are tens of states: dense is fine).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;

/// Observed (possibly decayed) transition counts: from state -> to state -> weight.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TransitionTable {
    counts: BTreeMap<String, BTreeMap<String, f64>>,
    /// Every state named so far, in the order first seen (reports list states in this order).
    #[serde(skip)]
    order: Vec<String>,
}

impl TransitionTable {
    pub fn new() -> TransitionTable {
        TransitionTable::default()
    }

    /// Adds `weight` observations of `from -> to`. Negative or non-finite weights are ignored.
    pub fn add(&mut self, from: &str, to: &str, weight: f64) {
        self.note_state(from);
        self.note_state(to);
        if !(weight.is_finite() && weight >= 0.0) {
            return;
        }
        *self
            .counts
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .or_insert(0.0) += weight;
    }

    /// Names a state even if no transition involving it was observed (e.g. a configured artifact).
    pub fn note_state(&mut self, state: &str) {
        if !self.order.iter().any(|known| known == state) {
            self.order.push(state.to_string());
        }
    }

    /// The weight of `from -> to`.
    pub fn count(&self, from: &str, to: &str) -> f64 {
        self.counts
            .get(from)
            .and_then(|row| row.get(to))
            .copied()
            .unwrap_or(0.0)
    }

    /// Total weight of the departures observed from `state`.
    pub fn exits(&self, state: &str) -> f64 {
        self.counts.get(state).map_or(0.0, |row| row.values().sum())
    }

    /// States in the order first seen.
    pub fn states(&self) -> &[String] {
        &self.order
    }

    /// Rows of the table: from -> to -> weight.
    pub fn rows(&self) -> &BTreeMap<String, BTreeMap<String, f64>> {
        &self.counts
    }
}

/// Which states end an object's life: artifacts (failures, each predicted separately) and
/// successes. Every other state with no observed departure is "unobserved": its outcome is unknown.
#[derive(Debug, Clone, PartialEq)]
pub struct Absorbing {
    pub artifacts: Vec<String>,
    pub successes: BTreeSet<String>,
}

/// What a state is in the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StateRole {
    /// Departures were observed from it.
    Transient,
    /// A configured failure state.
    Artifact,
    /// A configured successful end.
    Success,
    /// Not configured as an end, and nothing was ever seen leaving it: its outcome is unknown.
    Unobserved,
}

/// The prediction for one state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StateOutlook {
    pub role: StateRole,
    /// Weight of the departures observed from this state (how much evidence its row rests on).
    pub exits: f64,
    /// Artifact -> probability of eventually ending in it.
    pub artifacts: BTreeMap<String, f64>,
    /// Probability of eventually ending in a success state.
    pub success: f64,
    /// Probability of reaching an unobserved state (so every artifact probability is a lower bound
    /// and may rise by at most this much).
    pub unknown: f64,
    /// Probability of entering a cycle no departure was ever seen leaving: such objects never end.
    pub trapped: f64,
    /// Standard error of `failure()` from the finite counts behind it (delta method: each row's
    /// multinomial uncertainty, weighted by the expected visits to that row; see `failure_variance`).
    pub failure_std_error: f64,
    /// Expected number of transitions until the object ends; `None` when it may never end.
    pub expected_steps: Option<f64>,
    /// Expected seconds until the object ends, when every state on the way has a mean dwell time;
    /// `None` otherwise or when it may never end.
    pub expected_seconds: Option<f64>,
}

impl StateOutlook {
    /// Probability of ending in any artifact.
    pub fn failure(&self) -> f64 {
        self.artifacts.values().sum()
    }
}

/// Predictions for every state of a chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outlook {
    /// Artifact names, in configured order.
    pub artifacts: Vec<String>,
    /// States in the order first seen, then artifacts never seen.
    pub order: Vec<String>,
    pub states: BTreeMap<String, StateOutlook>,
    /// The counts the predictions were solved from.
    pub table: TransitionTable,
}

impl Outlook {
    pub fn state(&self, state: &str) -> Option<&StateOutlook> {
        self.states.get(state)
    }

    /// Probability of ending in `artifact` from `state`; `None` for a state never seen.
    pub fn probability(&self, state: &str, artifact: &str) -> Option<f64> {
        self.states
            .get(state)
            .map(|outlook| outlook.artifacts.get(artifact).copied().unwrap_or(0.0))
    }
}

/// Below this a pivot counts as zero. Rows are probabilities, so the matrix is well scaled.
const SINGULAR: f64 = 1e-13;

/// Solves the chain. `mean_dwell_seconds` (optional per state) gives the expected time to the end.
pub fn solve(
    table: &TransitionTable,
    absorbing: &Absorbing,
    mean_dwell_seconds: &BTreeMap<String, f64>,
) -> Outlook {
    let mut order: Vec<String> = table.states().to_vec();
    for artifact in &absorbing.artifacts {
        if !order.contains(artifact) {
            order.push(artifact.clone());
        }
    }
    let chain = Chain::new(table, absorbing, &order);
    let solved = chain.solve(mean_dwell_seconds);
    let states = order
        .iter()
        .map(|state| (state.clone(), chain.outlook(state, &solved)))
        .collect();
    Outlook {
        artifacts: absorbing.artifacts.clone(),
        order,
        states,
        table: table.clone(),
    }
}

fn role_of(table: &TransitionTable, absorbing: &Absorbing, state: &str) -> StateRole {
    if absorbing.artifacts.iter().any(|a| a == state) {
        StateRole::Artifact
    } else if absorbing.successes.contains(state) {
        StateRole::Success
    } else if table.exits(state) > 0.0 {
        StateRole::Transient
    } else {
        StateRole::Unobserved
    }
}

/// Where each quantity sits among the right-hand columns of the linear system: one per artifact,
/// then success, unknown, trapped, steps, seconds, and the identity (whose solution is the
/// fundamental matrix: expected visits to each state).
#[derive(Debug, Clone, Copy)]
struct Columns {
    artifacts: usize,
}

impl Columns {
    fn success(self) -> usize {
        self.artifacts
    }
    fn unknown(self) -> usize {
        self.artifacts + 1
    }
    fn trapped(self) -> usize {
        self.artifacts + 2
    }
    fn steps(self) -> usize {
        self.artifacts + 3
    }
    fn seconds(self) -> usize {
        self.artifacts + 4
    }
    /// The identity column of solvable state `row` (with `row` = their count: the width).
    fn visits(self, row: usize) -> usize {
        self.artifacts + 5 + row
    }
}

/// (I - Q) X = rhs, with whether each row's state has a mean dwell time.
struct LinearSystem {
    matrix: Vec<Vec<f64>>,
    rhs: Vec<Vec<f64>>,
    seconds_known: Vec<bool>,
}

/// The solution, and what the per-state outlooks need besides.
struct Solved {
    /// Row i belongs to solvable state i; `None` when I - Q is singular.
    solution: Option<Vec<Vec<f64>>>,
    /// Whether a solvable state's expected time is defined: it and every state it can reach must
    /// have a mean dwell time.
    seconds_defined: Vec<bool>,
    /// Each solvable row's variance of the failure probability (see `failure_variance`).
    row_variance: Vec<f64>,
}

/// A chain sorted out for solving: its transient states that can end are the rows of the system.
struct Chain<'a> {
    table: &'a TransitionTable,
    absorbing: &'a Absorbing,
    solvable: Vec<&'a str>,
    index: BTreeMap<&'a str, usize>,
    columns: Columns,
}

impl<'a> Chain<'a> {
    fn new(table: &'a TransitionTable, absorbing: &'a Absorbing, order: &'a [String]) -> Self {
        let role = |state: &str| role_of(table, absorbing, state);
        let transient: Vec<&str> = order
            .iter()
            .map(String::as_str)
            .filter(|s| role(s) == StateRole::Transient)
            .collect();
        let solvable = states_that_can_end(table, &transient, &role);
        let index = solvable.iter().enumerate().map(|(i, s)| (*s, i)).collect();
        Chain {
            table,
            absorbing,
            solvable,
            index,
            columns: Columns {
                artifacts: absorbing.artifacts.len(),
            },
        }
    }

    fn role_of(&self, state: &str) -> StateRole {
        role_of(self.table, self.absorbing, state)
    }

    fn solve(&self, mean_dwell_seconds: &BTreeMap<String, f64>) -> Solved {
        let system = self.system(mean_dwell_seconds);
        let solution = gaussian_elimination(system.matrix, system.rhs);
        let seconds_defined = reach_all(
            self.table,
            &self.solvable,
            &self.index,
            &system.seconds_known,
        );
        let row_variance = self.row_variances(solution.as_deref());
        Solved {
            solution,
            seconds_defined,
            row_variance,
        }
    }

    fn system(&self, mean_dwell_seconds: &BTreeMap<String, f64>) -> LinearSystem {
        let columns = self.columns;
        let n = self.solvable.len();
        let mut matrix = vec![vec![0.0; n]; n];
        let mut rhs = vec![vec![0.0; columns.visits(n)]; n];
        let mut seconds_known = vec![true; n];
        for (i, state) in self.solvable.iter().enumerate() {
            matrix[i][i] = 1.0;
            let exits = self.table.exits(state);
            for (to, weight) in &self.table.rows()[*state] {
                let p = weight / exits;
                if let Some(&j) = self.index.get(to.as_str()) {
                    matrix[i][j] -= p;
                    continue;
                }
                rhs[i][self.outcome_column(to)] += p;
            }
            rhs[i][columns.steps()] = 1.0;
            rhs[i][columns.visits(i)] = 1.0;
            match mean_dwell_seconds.get(*state) {
                Some(seconds) => rhs[i][columns.seconds()] = *seconds,
                None => seconds_known[i] = false,
            }
        }
        LinearSystem {
            matrix,
            rhs,
            seconds_known,
        }
    }

    /// The right-hand column a step from a solvable state to the non-solvable `to` adds to.
    fn outcome_column(&self, to: &str) -> usize {
        match self.role_of(to) {
            StateRole::Artifact => self
                .absorbing
                .artifacts
                .iter()
                .position(|a| a == to)
                .unwrap(),
            StateRole::Success => self.columns.success(),
            StateRole::Unobserved => self.columns.unknown(),
            // A transient state outside `solvable` can never end.
            StateRole::Transient => self.columns.trapped(),
        }
    }

    fn row_variances(&self, solution: Option<&[Vec<f64>]>) -> Vec<f64> {
        // Probability of failure from any state: what each row's outcomes are worth.
        let failure_from = |state: &str| -> f64 {
            match (self.role_of(state), self.index.get(state), solution) {
                (StateRole::Artifact, _, _) => 1.0,
                (StateRole::Transient, Some(&j), Some(solution)) => solution[j]
                    [..self.columns.artifacts]
                    .iter()
                    .map(|p| clamp01(*p))
                    .sum(),
                _ => 0.0,
            }
        };
        self.solvable
            .iter()
            .map(|state| failure_variance(&self.table.rows()[*state], &failure_from))
            .collect()
    }

    /// The outlook of any state: an end state's is certain, a transient one's is read from its
    /// row of the solution (or it is trapped when it has none).
    fn outlook(&self, state: &str, solved: &Solved) -> StateOutlook {
        let role = self.role_of(state);
        let mut outlook = StateOutlook {
            role,
            exits: self.table.exits(state),
            artifacts: self
                .absorbing
                .artifacts
                .iter()
                .map(|a| (a.clone(), if a == state { 1.0 } else { 0.0 }))
                .collect(),
            success: if role == StateRole::Success { 1.0 } else { 0.0 },
            unknown: if role == StateRole::Unobserved {
                1.0
            } else {
                0.0
            },
            trapped: 0.0,
            failure_std_error: 0.0,
            expected_steps: (role != StateRole::Unobserved).then_some(0.0),
            expected_seconds: (role != StateRole::Unobserved).then_some(0.0),
        };
        if role == StateRole::Transient {
            match (self.index.get(state), &solved.solution) {
                (Some(&i), Some(solution)) => self.read_row(&mut outlook, i, solved, solution),
                _ => {
                    outlook.trapped = 1.0;
                    outlook.expected_steps = None;
                    outlook.expected_seconds = None;
                }
            }
        }
        outlook
    }

    /// Fills a solvable state's outlook from row `i` of the solution.
    fn read_row(
        &self,
        outlook: &mut StateOutlook,
        i: usize,
        solved: &Solved,
        solution: &[Vec<f64>],
    ) {
        let (columns, row) = (self.columns, &solution[i]);
        for (k, artifact) in self.absorbing.artifacts.iter().enumerate() {
            outlook.artifacts.insert(artifact.clone(), clamp01(row[k]));
        }
        outlook.success = clamp01(row[columns.success()]);
        outlook.unknown = clamp01(row[columns.unknown()]);
        outlook.trapped = clamp01(row[columns.trapped()]);
        let variance: f64 = (0..self.solvable.len())
            .map(|s| row[columns.visits(s)].powi(2) * solved.row_variance[s])
            .sum();
        outlook.failure_std_error = variance.max(0.0).sqrt();
        let ends_surely = outlook.trapped <= 1e-12;
        outlook.expected_steps = ends_surely.then_some(row[columns.steps()]);
        outlook.expected_seconds =
            (ends_surely && solved.seconds_defined[i]).then_some(row[columns.seconds()]);
    }
}

/// The variance of the failure probability one row contributes: the row is a multinomial sample of
/// `exits` departures, each worth the failure probability `h` of where it went, so the estimate of
/// Σ p·h has variance Var(h)/exits. One pseudo-departure to a sure failure and one to a sure success
/// keep a small row (5 of 5 departures failed) from claiming zero uncertainty, like the
/// Agresti-Coull interval does for a proportion.
fn failure_variance(row: &BTreeMap<String, f64>, failure_from: &dyn Fn(&str) -> f64) -> f64 {
    let (mut weight, mut sum, mut sum_squares) = (2.0, 1.0, 1.0);
    for (to, w) in row {
        let h = failure_from(to);
        weight += w;
        sum += w * h;
        sum_squares += w * h * h;
    }
    let mean = sum / weight;
    (sum_squares / weight - mean * mean).max(0.0) / weight
}

fn clamp01(value: f64) -> f64 {
    value.clamp(0.0, 1.0)
}

/// Transient states from which some absorbing or unobserved state is reachable. The others form
/// closed cycles: including them would make I - Q singular.
fn states_that_can_end<'a>(
    table: &TransitionTable,
    transient: &[&'a str],
    role_of: &dyn Fn(&str) -> StateRole,
) -> Vec<&'a str> {
    let mut can_end: BTreeSet<&str> = BTreeSet::new();
    let mut queue: VecDeque<&str> = VecDeque::new();
    for state in transient {
        let ends_directly = table.rows()[*state]
            .iter()
            .any(|(to, w)| *w > 0.0 && role_of(to) != StateRole::Transient);
        if ends_directly && can_end.insert(state) {
            queue.push_back(state);
        }
    }
    // Backwards search: a state that can step into one that can end can end too.
    while let Some(reached) = queue.pop_front() {
        for state in transient {
            if !can_end.contains(state) && table.count(state, reached) > 0.0 {
                can_end.insert(state);
                queue.push_back(state);
            }
        }
    }
    transient
        .iter()
        .copied()
        .filter(|s| can_end.contains(s))
        .collect()
}

/// For each solvable state: whether every solvable state reachable from it (itself included) is
/// `known`.
fn reach_all(
    table: &TransitionTable,
    solvable: &[&str],
    index: &BTreeMap<&str, usize>,
    known: &[bool],
) -> Vec<bool> {
    (0..solvable.len())
        .map(|start| {
            let mut seen = vec![false; solvable.len()];
            let mut stack = vec![start];
            seen[start] = true;
            while let Some(i) = stack.pop() {
                if !known[i] {
                    return false;
                }
                for (to, weight) in &table.rows()[solvable[i]] {
                    if let Some(&j) = index.get(to.as_str()) {
                        if *weight > 0.0 && !seen[j] {
                            seen[j] = true;
                            stack.push(j);
                        }
                    }
                }
            }
            true
        })
        .collect()
}

/// Solves `matrix · X = rhs` (X has as many columns as rhs). `None` if the matrix is singular.
fn gaussian_elimination(
    mut matrix: Vec<Vec<f64>>,
    mut rhs: Vec<Vec<f64>>,
) -> Option<Vec<Vec<f64>>> {
    let n = matrix.len();
    for column in 0..n {
        let pivot = (column..n)
            .max_by(|&a, &b| matrix[a][column].abs().total_cmp(&matrix[b][column].abs()))?;
        if matrix[pivot][column].abs() < SINGULAR {
            return None;
        }
        matrix.swap(column, pivot);
        rhs.swap(column, pivot);
        let (upper, lower) = matrix.split_at_mut(column + 1);
        let (rhs_upper, rhs_lower) = rhs.split_at_mut(column + 1);
        let (pivot_row, pivot_rhs) = (&upper[column], &rhs_upper[column]);
        for (row, row_rhs) in lower.iter_mut().zip(rhs_lower.iter_mut()) {
            let factor = row[column] / pivot_row[column];
            if factor == 0.0 {
                continue;
            }
            for (value, above) in row[column..].iter_mut().zip(&pivot_row[column..]) {
                *value -= factor * above;
            }
            for (value, above) in row_rhs.iter_mut().zip(pivot_rhs) {
                *value -= factor * above;
            }
        }
    }
    for row in (0..n).rev() {
        let (solved_and_current, below) = rhs.split_at_mut(row + 1);
        let current = &mut solved_and_current[row];
        for (coefficient, solved) in matrix[row][row + 1..].iter().zip(below.iter()) {
            for (value, known) in current.iter_mut().zip(solved) {
                *value -= coefficient * known;
            }
        }
        let diagonal = matrix[row][row];
        for value in current.iter_mut() {
            *value /= diagonal;
        }
    }
    Some(rhs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_absorbing(successes: &[&str]) -> Absorbing {
        Absorbing {
            artifacts: vec![
                "error state failure".to_string(),
                "time threshold failure".to_string(),
            ],
            successes: successes.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The worked example of issue 7.
    pub(crate) fn worked_example() -> TransitionTable {
        let mut table = TransitionTable::new();
        for (from, to, count) in [
            ("API request", "5XX response", 1.0),
            ("API request", "server-side exception", 2.0),
            ("API request", "process start", 97.0),
            ("process start", "X", 97.0),
            ("X", "Y", 30.0),
            ("X", "Z", 67.0),
            ("Y", "F", 10.0),
            ("Y", "complete", 17.0),
            ("Y", "error state failure", 3.0),
            ("Z", "complete", 67.0),
            ("F", "complete", 6.0),
            ("F", "time threshold failure", 4.0),
        ] {
            table.add(from, to, count);
        }
        table
    }

    #[test]
    fn worked_example_comes_out_exactly() {
        let outlook = solve(
            &worked_example(),
            &default_absorbing(&["complete"]),
            &BTreeMap::new(),
        );
        let p = |state, artifact| outlook.probability(state, artifact).unwrap();
        assert!((p("Y", "error state failure") - 0.10).abs() < 1e-12);
        assert!((p("F", "time threshold failure") - 0.40).abs() < 1e-12);
        assert!((p("Y", "time threshold failure") - 10.0 / 30.0 * 0.4).abs() < 1e-12);
        assert!((p("X", "error state failure") - 3.0 / 97.0).abs() < 1e-12);
        assert!((p("API request", "error state failure") - 0.03).abs() < 1e-12);
        assert!((p("API request", "time threshold failure") - 0.04).abs() < 1e-12);
        assert_eq!(p("Z", "error state failure"), 0.0);
        assert_eq!(p("Z", "time threshold failure"), 0.0);
        assert_eq!(p("error state failure", "error state failure"), 1.0);
        // The two early failures are sinks nobody configured: their outcome is unknown.
        let request = outlook.state("API request").unwrap();
        assert!((request.unknown - 0.03).abs() < 1e-12);
        assert!((request.success - 0.90).abs() < 1e-12);
        assert_eq!(
            outlook.state("5XX response").unwrap().role,
            StateRole::Unobserved
        );
        // Steps: F ends in 1, Y in 1 + 1/3, X in 1 + 30/97 · 4/3 + 67/97.
        let steps = |s: &str| outlook.state(s).unwrap().expected_steps.unwrap();
        assert!((steps("F") - 1.0).abs() < 1e-12);
        assert!((steps("Y") - 4.0 / 3.0).abs() < 1e-12);
        assert!((steps("X") - (1.0 + 30.0 / 97.0 * 4.0 / 3.0 + 67.0 / 97.0)).abs() < 1e-12);
    }

    #[test]
    fn cycles_are_solved() {
        // A retry loop: B goes back to A a third of the time.
        let mut table = TransitionTable::new();
        table.add("A", "B", 10.0);
        table.add("B", "A", 10.0);
        table.add("B", "done", 10.0);
        table.add("B", "error state failure", 10.0);
        table.add("A", "A", 10.0);
        let outlook = solve(&table, &default_absorbing(&["done"]), &BTreeMap::new());
        // From B: p = 1/3 + 1/3 · p_A, p_A = p_B (A's self-loop only delays) => p = 1/2.
        let p_b = outlook.probability("B", "error state failure").unwrap();
        let p_a = outlook.probability("A", "error state failure").unwrap();
        assert!((p_b - 0.5).abs() < 1e-12, "{p_b}");
        assert!((p_a - 0.5).abs() < 1e-12, "{p_a}");
        // Steps from B: t_B = 1 + t_A/3, t_A = 1 + t_A/2 + t_B/2 => t_A = 2 + t_B => t_B = 2.5.
        let t_b = outlook.state("B").unwrap().expected_steps.unwrap();
        assert!((t_b - 2.5).abs() < 1e-12, "{t_b}");
    }

    #[test]
    fn closed_cycles_are_trapped_and_do_not_break_the_solve() {
        let mut table = TransitionTable::new();
        table.add("start", "loop1", 1.0);
        table.add("start", "error state failure", 1.0);
        table.add("loop1", "loop2", 5.0);
        table.add("loop2", "loop1", 5.0);
        let outlook = solve(&table, &default_absorbing(&[]), &BTreeMap::new());
        let start = outlook.state("start").unwrap();
        assert!((start.artifacts["error state failure"] - 0.5).abs() < 1e-12);
        assert!((start.trapped - 0.5).abs() < 1e-12);
        assert_eq!(start.expected_steps, None);
        let inner = outlook.state("loop1").unwrap();
        assert_eq!(inner.trapped, 1.0);
        assert_eq!(inner.failure(), 0.0);
    }

    #[test]
    fn unreachable_and_unseen_artifacts_get_zero() {
        let mut table = TransitionTable::new();
        table.add("a", "b", 3.0);
        table.add("b", "ok", 3.0);
        let outlook = solve(&table, &default_absorbing(&["ok"]), &BTreeMap::new());
        assert_eq!(
            outlook.probability("a", "time threshold failure"),
            Some(0.0)
        );
        assert_eq!(
            outlook.probability("time threshold failure", "time threshold failure"),
            Some(1.0)
        );
        assert_eq!(
            outlook.probability("never seen", "error state failure"),
            None
        );
        assert_eq!(outlook.state("a").unwrap().success, 1.0);
    }

    #[test]
    fn expected_seconds_need_every_dwell_on_the_way() {
        let mut table = TransitionTable::new();
        table.add("a", "b", 1.0);
        table.add("b", "ok", 1.0);
        table.add("c", "ok", 1.0);
        let mut dwell = BTreeMap::from([("b".to_string(), 2.0), ("c".to_string(), 5.0)]);
        let outlook = solve(&table, &default_absorbing(&["ok"]), &dwell);
        assert_eq!(outlook.state("a").unwrap().expected_seconds, None);
        assert_eq!(outlook.state("b").unwrap().expected_seconds, Some(2.0));
        dwell.insert("a".to_string(), 1.0);
        let outlook = solve(&table, &default_absorbing(&["ok"]), &dwell);
        assert_eq!(outlook.state("a").unwrap().expected_seconds, Some(3.0));
    }

    #[test]
    fn standard_errors_shrink_with_more_observations() {
        let outlook = |scale: f64| {
            let mut table = TransitionTable::new();
            table.add("start", "media", 100.0 * scale);
            table.add("media", "error state failure", 2.0 * scale);
            table.add("media", "ok", 8.0 * scale);
            solve(&table, &default_absorbing(&["ok"]), &BTreeMap::new())
        };
        let small = outlook(1.0);
        let large = outlook(100.0);
        let se = |o: &Outlook| o.state("start").unwrap().failure_std_error;
        assert!((small.state("start").unwrap().failure() - 0.2).abs() < 1e-12);
        // Each row gets one pseudo-departure to a failure and one to a success. Media's 10
        // departures: mean 3/12, Var (3/12)(9/12)/12. Start's 100 departures, all worth 0.2:
        // mean 21/102, second moment 5/102.
        let media = (3.0 / 12.0) * (9.0 / 12.0) / 12.0;
        let start = (5.0 / 102.0 - (21.0f64 / 102.0).powi(2)) / 102.0;
        let expected = (media + start).sqrt();
        assert!((se(&small) - expected).abs() < 1e-12, "{}", se(&small));
        assert!(se(&large) < se(&small) / 5.0);
    }

    #[test]
    fn pivoting_handles_a_zero_leading_entry() {
        // Row order puts a zero on the diagonal after elimination without pivoting.
        let solution = gaussian_elimination(
            vec![vec![0.0, 1.0], vec![1.0, 1.0]],
            vec![vec![2.0], vec![3.0]],
        )
        .unwrap();
        assert!((solution[0][0] - 1.0).abs() < 1e-12);
        assert!((solution[1][0] - 2.0).abs() < 1e-12);
        assert!(gaussian_elimination(
            vec![vec![1.0, 2.0], vec![2.0, 4.0]],
            vec![vec![1.0], vec![2.0]]
        )
        .is_none());
    }
}
