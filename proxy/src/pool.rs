//! Where jobs go: the weighted pools of one config version, sessions pinned to machines, and the
//! drain of machines removed while they still hold sessions.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use understudy_wire::{MachineState, MachineStatus, PoolRole};

use crate::config::ValidConfig;
use crate::mirror::{CopyTarget, Lane};
use crate::stats::{SeriesHandle, Stats};
use crate::upstream::Upstream;

/// A machine and its weight, as a pool is built.
type Weighted = (Arc<Machine>, u32);

/// One machine of a config version.
pub(crate) struct Machine {
    pub id: Arc<str>,
    pub version: Arc<str>,
    pub role: PoolRole,
    pub address: SocketAddr,
    pub series: Arc<SeriesHandle>,
    /// A simulation machine's copy lane (its version's), resolved when the config is applied so
    /// that a copy finds it without a lookup; `None` for active machines.
    pub lane: Option<Arc<Lane>>,
    /// The keep-alive connections to the machine's address and its health, kept across config
    /// versions.
    pub upstream: Arc<Upstream>,
    /// What its probe asks for (`None`: a TCP connect).
    pub health_path: Option<Arc<str>>,
}

impl Machine {
    pub(crate) fn is_failing(&self) -> bool {
        self.upstream.health.is_failing()
    }
}

impl CopyTarget for Machine {
    fn id(&self) -> &str {
        &self.id
    }
    fn version(&self) -> &str {
        &self.version
    }
    fn address(&self) -> SocketAddr {
        self.address
    }
    fn series(&self) -> &SeriesHandle {
        &self.series
    }
}

/// Machines of one pool with a smooth weighted round-robin schedule: each machine gets its share of
/// picks, spread out rather than in bursts.
pub(crate) struct Pool {
    machines: Vec<Arc<Machine>>,
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl Pool {
    fn new(machines: Vec<Weighted>) -> Self {
        let gcd = machines.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
        let weights: Vec<i64> = machines.iter().map(|(_, w)| i64::from(w / gcd)).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += w;
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
                .expect("pool is not empty when total > 0");
            current[best] -= total;
            schedule.push(best as u32);
        }
        Pool {
            machines: machines.into_iter().map(|(m, _)| m).collect(),
            schedule,
            next: AtomicUsize::new(0),
        }
    }

    pub(crate) fn pick(&self) -> Option<&Arc<Machine>> {
        if self.schedule.is_empty() {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.machines.get(self.schedule[slot] as usize)
    }

    /// The next machine by weight that is not failing; when every machine fails, the next one
    /// by weight anyway (the job then fails as it would have, rather than being refused here).
    pub(crate) fn pick_serving(&self) -> Option<&Arc<Machine>> {
        let picked = self.pick()?;
        if !picked.is_failing() {
            return Some(picked);
        }
        self.answering_where(|_| true).or(Some(picked))
    }

    /// A machine to send a job to instead of `failed` (whose connection failed before it got a
    /// byte): another address, not failing.
    pub(crate) fn other_than(&self, failed: &Machine) -> Option<&Arc<Machine>> {
        self.answering_where(|m| m.address != failed.address)
    }

    /// The first machine not failing that `fits`, going round from the schedule's position:
    /// weights are set aside while a machine fails, its share going round the others in turn.
    fn answering_where(&self, fits: impl Fn(&Machine) -> bool) -> Option<&Arc<Machine>> {
        let start = self.next.load(Ordering::Relaxed);
        let n = self.machines.len();
        (0..n)
            .map(|i| &self.machines[(start + i) % n])
            .find(|m| fits(m) && !m.is_failing())
    }

    fn by_id(&self, id: &str) -> Option<&Arc<Machine>> {
        self.machines.iter().find(|m| &*m.id == id)
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The routing of one config version. Immutable: a push builds a new one and swaps it in.
pub(crate) struct Table {
    pub config: ValidConfig,
    pub active: Pool,
    /// One pool per simulation version (v2, and a v1 A/A control), sorted by version.
    pub simulation: Vec<(Arc<str>, Pool)>,
    /// Every simulation machine, for jobs that already carry the simulation header.
    pub simulation_any: Pool,
}

impl Table {
    /// `lane_of` gives the copy lane of a simulation version, `upstream_of` the connections to
    /// an address.
    pub(crate) fn new(
        config: ValidConfig,
        stats: &Stats,
        lane_of: impl Fn(&Arc<str>) -> Option<Arc<Lane>>,
        upstream_of: impl Fn(SocketAddr) -> Arc<Upstream>,
    ) -> Self {
        let mut active = Vec::new();
        let mut simulation: Vec<(Arc<str>, Vec<Weighted>)> = Vec::new();
        let mut simulation_any = Vec::new();
        for m in &config.machines {
            let machine = Arc::new(Machine {
                id: m.id.clone(),
                version: m.version.clone(),
                role: m.role,
                address: m.address,
                series: stats.series(&m.version, m.role),
                lane: match m.role {
                    PoolRole::Simulation => lane_of(&m.version),
                    PoolRole::Active => None,
                },
                upstream: upstream_of(m.address),
                health_path: m.health_path.clone(),
            });
            match m.role {
                PoolRole::Active => active.push((machine, m.weight)),
                PoolRole::Simulation => {
                    simulation_any.push((machine.clone(), m.weight));
                    match simulation.iter_mut().find(|(v, _)| *v == m.version) {
                        Some((_, pool)) => pool.push((machine, m.weight)),
                        None => simulation.push((m.version.clone(), vec![(machine, m.weight)])),
                    }
                }
            }
        }
        simulation.sort_by(|a, b| a.0.cmp(&b.0));
        Table {
            active: Pool::new(active),
            simulation: simulation
                .into_iter()
                .map(|(v, machines)| (v, Pool::new(machines)))
                .collect(),
            simulation_any: Pool::new(simulation_any),
            config,
        }
    }

    /// The machine of the table with this id, in either pool.
    pub(crate) fn machine(&self, id: &str) -> Option<&Arc<Machine>> {
        self.active
            .by_id(id)
            .or_else(|| self.simulation_any.by_id(id))
    }

    /// Every machine of the table, active first.
    pub(crate) fn machines(&self) -> impl Iterator<Item = &Arc<Machine>> {
        self.active
            .machines
            .iter()
            .chain(&self.simulation_any.machines)
    }

    /// Whether the job (or the session, when it has one) is in the mirrored fraction. Spread by a
    /// multiplicative hash so that any fraction is met closely and deterministically.
    fn mirrors(&self, key: u64) -> bool {
        let fraction = self.config.mirror_fraction;
        if self.simulation.is_empty() || fraction <= 0.0 {
            return false;
        }
        if fraction >= 1.0 {
            return true;
        }
        let spread = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
        (spread as f64 / (1u64 << 53) as f64) < fraction
    }
}

/// Where one job goes.
pub(crate) struct Route {
    pub machine: Arc<Machine>,
    /// One simulation machine per simulation version, when the job is mirrored.
    pub mirror: Vec<Arc<Machine>>,
}

struct Pin {
    active: Option<Arc<Machine>>,
    simulation: Vec<Arc<Machine>>,
    /// For jobs that arrive already marked as simulation traffic.
    simulation_only: Option<Arc<Machine>>,
    last_seen: Instant,
    /// When the call's last job came: the pin is kept a moment for jobs it overtook (sent
    /// before the end, arriving after it), so that they reach the call's machine too. An ended
    /// pin holds no session: drains and counts ignore it.
    ended: Option<Instant>,
}

/// How long an ended session's pin is kept for its straggling jobs.
const ENDED_PIN_GRACE: Duration = Duration::from_secs(2);

impl Pin {
    fn live(&self) -> bool {
        self.ended.is_none()
    }
}

struct Draining {
    machine: Arc<Machine>,
    deadline: Instant,
}

#[derive(Default)]
struct Sessions {
    pins: HashMap<String, Pin>,
    draining: Vec<Draining>,
}

pub(crate) struct Router {
    table: RwLock<Arc<Table>>,
    sessions: Mutex<Sessions>,
    /// The most sessions pinned at once: a new session beyond it is refused, so callers that
    /// invent session ids cannot grow the table without bound.
    max_sessions: usize,
}

/// A new session was refused: the table of pinned sessions is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} sessions are pinned already, the most this balancer keeps")]
pub(crate) struct SessionsFull(pub usize);

impl Sessions {
    /// The pin of `session`, made (when there is room) if it is new.
    fn pin(&mut self, session: &str, now: Instant, max: usize) -> Result<&mut Pin, SessionsFull> {
        if self.pins.len() >= max && !self.pins.contains_key(session) {
            // Ended pins only wait for stragglers: a new call comes first.
            self.pins.retain(|_, pin| pin.live());
        }
        let room = self.pins.len() < max;
        match self.pins.entry(session.to_owned()) {
            std::collections::hash_map::Entry::Occupied(pin) => {
                let pin = pin.into_mut();
                pin.last_seen = now;
                Ok(pin)
            }
            std::collections::hash_map::Entry::Vacant(_) if !room => Err(SessionsFull(max)),
            std::collections::hash_map::Entry::Vacant(slot) => Ok(slot.insert(Pin {
                active: None,
                simulation: Vec::new(),
                simulation_only: None,
                last_seen: now,
                ended: None,
            })),
        }
    }
}

fn session_key(session: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut hasher);
    hasher.finish()
}

impl Router {
    pub(crate) fn new(table: Table, max_sessions: usize) -> Self {
        Router {
            table: RwLock::new(Arc::new(table)),
            sessions: Mutex::new(Sessions::default()),
            max_sessions,
        }
    }

    pub(crate) fn table(&self) -> Arc<Table> {
        self.table.read().expect("table lock").clone()
    }

    /// Routes a caller's job: to an active machine (sticky by session), plus the simulation
    /// machines that get a copy. `ends_session` unpins the session after this job.
    pub(crate) fn route(
        &self,
        job: u64,
        session: Option<&str>,
        ends_session: bool,
        now: Instant,
    ) -> Result<(Route, Arc<Table>), SessionsFull> {
        let Some(session) = session else {
            let table = self.table();
            let machine = table
                .active
                .pick_serving()
                .expect("validated configs have an active machine")
                .clone();
            let mirror = if table.mirrors(job) {
                table
                    .simulation
                    .iter()
                    .filter_map(|(_, pool)| pool.pick().cloned())
                    .collect()
            } else {
                Vec::new()
            };
            return Ok((Route { machine, mirror }, table));
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        // Read under the sessions lock: a swap holds it, so pins and table agree.
        let table = self.table();
        let pin = sessions.pin(session, now, self.max_sessions)?;
        // A call pinned to a machine that stopped answering moves on: its jobs there would fail.
        if pin.active.as_ref().is_some_and(|m| m.is_failing()) {
            if let Some(other) = pin
                .active
                .as_deref()
                .and_then(|m| table.active.other_than(m))
            {
                pin.active = Some(other.clone());
            }
        }
        let machine = pin
            .active
            .get_or_insert_with(|| {
                table
                    .active
                    .pick_serving()
                    .expect("validated configs have an active machine")
                    .clone()
            })
            .clone();
        let mut mirror = Vec::new();
        if table.mirrors(session_key(session)) {
            for (version, pool) in &table.simulation {
                match pin.simulation.iter().find(|m| m.version == *version) {
                    Some(m) => mirror.push(m.clone()),
                    None => {
                        if let Some(m) = pool.pick() {
                            pin.simulation.push(m.clone());
                            mirror.push(m.clone());
                        }
                    }
                }
            }
        }
        if ends_session {
            pin.ended.get_or_insert(now);
        }
        Ok((Route { machine, mirror }, table))
    }

    /// Routes a job that already carries the simulation header: to a simulation machine only.
    pub(crate) fn route_simulation_only(
        &self,
        session: Option<&str>,
        ends_session: bool,
        now: Instant,
    ) -> Result<Option<Arc<Machine>>, SessionsFull> {
        let Some(session) = session else {
            return Ok(self.table().simulation_any.pick().cloned());
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let table = self.table();
        let pin = sessions.pin(session, now, self.max_sessions)?;
        let machine = match &pin.simulation_only {
            Some(m) => Some(m.clone()),
            None => {
                let picked = table.simulation_any.pick().cloned();
                pin.simulation_only = picked.clone();
                picked
            }
        };
        if machine.is_none() {
            sessions.pins.remove(session);
        } else if ends_session {
            pin.ended.get_or_insert(now);
        }
        Ok(machine)
    }

    /// Installs a new table. Sessions keep their machines when those are still in the same pool;
    /// sessions of a removed active machine keep it while it drains.
    pub(crate) fn swap(&self, table: Table, now: Instant) {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let drain_timeout = table.config.drain_timeout;
        let mut newly_draining: Vec<Arc<Machine>> = Vec::new();
        // An ended pin's stragglers go to a new machine rather than to one that left the table.
        sessions.pins.retain(|_, pin| {
            pin.live()
                || pin
                    .active
                    .as_ref()
                    .is_none_or(|m| table.active.by_id(&m.id).is_some())
        });
        for pin in sessions.pins.values_mut().filter(|p| p.live()) {
            if let Some(old) = &pin.active {
                match table.active.by_id(&old.id) {
                    Some(current) => pin.active = Some(current.clone()),
                    None if drain_timeout > Duration::ZERO => {
                        if !newly_draining.iter().any(|m| m.id == old.id) {
                            newly_draining.push(old.clone());
                        }
                    }
                    None => pin.active = None,
                }
            }
            let same_simulation = |m: &Arc<Machine>| {
                table
                    .simulation_any
                    .by_id(&m.id)
                    .filter(|current| current.version == m.version)
                    .cloned()
            };
            pin.simulation = pin.simulation.iter().filter_map(same_simulation).collect();
            pin.simulation_only = pin.simulation_only.as_ref().and_then(same_simulation);
        }
        // A draining machine that is back in the active pool serves again.
        sessions
            .draining
            .retain(|d| table.active.by_id(&d.machine.id).is_none());
        for machine in newly_draining {
            if !sessions.draining.iter().any(|d| d.machine.id == machine.id) {
                sessions.draining.push(Draining {
                    machine,
                    deadline: now + drain_timeout,
                });
            }
        }
        *self.table.write().expect("table lock") = Arc::new(table);
    }

    /// Forgets idle sessions and ends drains: a draining machine goes when its last session ends
    /// or its deadline passes (its sessions then move to a serving machine on their next job).
    pub(crate) fn sweep(&self, now: Instant, session_idle: Duration) {
        let mut guard = self.sessions.lock().expect("sessions lock");
        let sessions = &mut *guard;
        sessions.pins.retain(|_, pin| match pin.ended {
            Some(ended) => now.saturating_duration_since(ended) < ENDED_PIN_GRACE,
            None => now.saturating_duration_since(pin.last_seen) < session_idle,
        });
        let pins = &mut sessions.pins;
        sessions.draining.retain(|d| {
            let on_it = |pin: &Pin| pin.active.as_ref().is_some_and(|m| m.id == d.machine.id);
            let over = now >= d.deadline || !pins.values().any(|p| p.live() && on_it(p));
            if over {
                // Its calls (and an ended call's stragglers) move on at their next job.
                for pin in pins.values_mut().filter(|p| on_it(p)) {
                    pin.active = None;
                }
            }
            !over
        });
    }

    /// Every machine of the running config and every draining one, with its pinned sessions.
    pub(crate) fn machine_status(&self) -> Vec<MachineStatus> {
        let sessions = self.sessions.lock().expect("sessions lock");
        let table = self.table();
        let mut counts: HashMap<(&str, PoolRole), u64> = HashMap::new();
        for pin in sessions.pins.values().filter(|p| p.live()) {
            if let Some(m) = &pin.active {
                *counts.entry((&m.id, PoolRole::Active)).or_default() += 1;
            }
            for m in pin.simulation.iter().chain(&pin.simulation_only) {
                *counts.entry((&m.id, PoolRole::Simulation)).or_default() += 1;
            }
        }
        let mut status: Vec<MachineStatus> = table
            .config
            .machines
            .iter()
            .map(|m| {
                let sessions = counts.get(&(&*m.id, m.role)).copied().unwrap_or(0);
                let (health, health_reason) = table
                    .machine(&m.id)
                    .map(|m| m.upstream.health.view())
                    .unwrap_or_default();
                MachineStatus {
                    id: m.id.to_string(),
                    version: m.version.to_string(),
                    config: m.role,
                    state: MachineState::Serving,
                    sessions,
                    health,
                    health_reason,
                }
            })
            .collect();
        status.extend(sessions.draining.iter().map(|d| {
            let (health, health_reason) = d.machine.upstream.health.view();
            MachineStatus {
                id: d.machine.id.to_string(),
                version: d.machine.version.to_string(),
                config: d.machine.role,
                state: MachineState::Draining,
                sessions: counts
                    .get(&(&*d.machine.id, PoolRole::Active))
                    .copied()
                    .unwrap_or(0),
                health,
                health_reason,
            }
        }));
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::stats::Retention;
    use understudy_wire::{BalancerConfig, MachineEntry};

    fn stats() -> Stats {
        Stats::new(
            "svc".into(),
            Arc::new(Metrics::new().unwrap()),
            Retention {
                epochs: 10,
                pairs: 10,
            },
        )
    }

    fn entry(id: &str, version: &str, weight: u32, role: PoolRole) -> MachineEntry {
        MachineEntry {
            id: id.into(),
            version: version.into(),
            address: "127.0.0.1:9".into(),
            weight,
            config: role,
            health_path: None,
        }
    }

    fn table(version: u64, machines: Vec<MachineEntry>, stats: &Stats) -> Table {
        let config = BalancerConfig {
            service: "svc".into(),
            version,
            epoch: 0,
            mirror_fraction: 1.0,
            compare_body: false,
            compare: None,
            compare_headers: Vec::new(),
            drain_timeout_ms: 1000,
            machines,
        };
        Table::new(
            ValidConfig::new(&config).unwrap(),
            stats,
            |_| None,
            |address| {
                Arc::new(Upstream::new(
                    address,
                    Duration::from_secs(1),
                    Duration::from_secs(50),
                    2,
                ))
            },
        )
    }

    #[test]
    fn weights_are_honoured_and_spread() {
        let stats = stats();
        let t = table(
            1,
            vec![
                entry("a", "v1", 300, PoolRole::Active),
                entry("b", "v1", 100, PoolRole::Active),
            ],
            &stats,
        );
        let picks: Vec<String> = (0..8)
            .map(|_| t.active.pick().unwrap().id.to_string())
            .collect();
        assert_eq!(picks.iter().filter(|p| *p == "a").count(), 6);
        // Smooth: never more than three a's in a row.
        assert!(!picks.concat().contains("aaaa"), "{picks:?}");
    }

    #[test]
    fn mirror_fraction_is_met() {
        let stats = stats();
        let mut t = table(
            1,
            vec![
                entry("a", "v1", 1, PoolRole::Active),
                entry("s", "v2", 1, PoolRole::Simulation),
            ],
            &stats,
        );
        t.config.mirror_fraction = 0.25;
        let mirrored = (0..10_000u64).filter(|j| t.mirrors(*j)).count();
        assert!((2_400..=2_600).contains(&mirrored), "{mirrored}");
    }

    #[test]
    fn failing_machines_get_no_new_job_and_their_calls_move_while_another_answers() {
        let stats = stats();
        let at = |id: &str, port: &str| MachineEntry {
            address: format!("127.0.0.1:{port}"),
            ..entry(id, "v1", 1, PoolRole::Active)
        };
        let router = Router::new(table(1, vec![at("a", "7001"), at("b", "7002")], &stats), 10);
        let t0 = Instant::now();
        let (call, _) = router.route(1, Some("call"), false, t0).unwrap();
        let pinned = call.machine.clone();
        for _ in 0..2 {
            pinned.upstream.health.failed("refused".into());
        }
        assert!(pinned.is_failing());
        let table = router.table();
        for job in 2..12 {
            let (route, _) = router.route(job, None, false, t0).unwrap();
            assert_ne!(route.machine.id, pinned.id, "job {job}");
        }
        let (moved, _) = router.route(12, Some("call"), false, t0).unwrap();
        assert_ne!(
            moved.machine.id, pinned.id,
            "the call left the failing machine"
        );
        let other = moved.machine.clone();
        // Every machine failing: jobs go by weight anyway (they fail as they would have).
        for _ in 0..2 {
            other.upstream.health.failed("refused".into());
        }
        assert!(table.active.pick_serving().is_some());
        assert!(table.active.other_than(&pinned).is_none());
        let (still, _) = router.route(13, Some("call"), false, t0).unwrap();
        assert_eq!(
            still.machine.id, other.id,
            "no better machine: the call stays"
        );
        other.upstream.health.passed();
        assert_eq!(table.active.other_than(&pinned).unwrap().id, other.id);
    }

    #[test]
    fn sessions_stick_through_a_pool_change_and_drain_when_removed() {
        let stats = stats();
        let router = Router::new(
            table(
                1,
                vec![
                    entry("a", "v1", 1, PoolRole::Active),
                    entry("b", "v1", 1, PoolRole::Active),
                    entry("s1", "v2", 1, PoolRole::Simulation),
                    entry("s2", "v2", 1, PoolRole::Simulation),
                ],
                &stats,
            ),
            1000,
        );
        let t0 = Instant::now();
        let pinned: HashMap<String, (String, String)> = (0..20)
            .map(|i| {
                let s = format!("call-{i}");
                let (route, _) = router.route(i, Some(&s), false, t0).unwrap();
                (
                    s,
                    (route.machine.id.to_string(), route.mirror[0].id.to_string()),
                )
            })
            .collect();
        // A new machine joins: every session stays where it was.
        router.swap(
            table(
                2,
                vec![
                    entry("a", "v1", 1, PoolRole::Active),
                    entry("b", "v1", 1, PoolRole::Active),
                    entry("c", "v1", 1000, PoolRole::Active),
                    entry("s1", "v2", 1, PoolRole::Simulation),
                    entry("s2", "v2", 1, PoolRole::Simulation),
                ],
                &stats,
            ),
            t0,
        );
        for (s, (active, sim)) in &pinned {
            let (route, _) = router.route(0, Some(s), false, t0).unwrap();
            assert_eq!(&*route.machine.id, active);
            assert_eq!(&*route.mirror[0].id, sim);
        }
        // "a" is removed: its sessions stay on it while it drains; no new session goes there.
        router.swap(
            table(
                3,
                vec![
                    entry("b", "v1", 1, PoolRole::Active),
                    entry("c", "v1", 1, PoolRole::Active),
                    entry("s1", "v2", 1, PoolRole::Simulation),
                    entry("s2", "v2", 1, PoolRole::Simulation),
                ],
                &stats,
            ),
            t0,
        );
        let on_a: Vec<&String> = pinned
            .iter()
            .filter(|(_, (m, _))| m == "a")
            .map(|(s, _)| s)
            .collect();
        assert!(!on_a.is_empty());
        for s in &on_a {
            assert_eq!(
                &*router.route(0, Some(s), false, t0).unwrap().0.machine.id,
                "a"
            );
        }
        for i in 0..50 {
            let fresh = format!("new-{i}");
            assert_ne!(
                &*router
                    .route(0, Some(&fresh), true, t0)
                    .unwrap()
                    .0
                    .machine
                    .id,
                "a"
            );
        }
        let status = router.machine_status();
        let a = status.iter().find(|m| m.id == "a").unwrap();
        assert_eq!(a.state, MachineState::Draining);
        assert_eq!(a.sessions, on_a.len() as u64);

        // One session ends; the drain deadline then passes: the rest move elsewhere.
        router.route(0, Some(on_a[0]), true, t0).unwrap();
        router.sweep(t0 + Duration::from_millis(1001), Duration::from_secs(60));
        assert!(router.machine_status().iter().all(|m| m.id != "a"));
        for s in &on_a {
            assert_ne!(
                &*router.route(0, Some(s), false, t0).unwrap().0.machine.id,
                "a"
            );
        }
    }

    #[test]
    fn drain_ends_when_the_last_session_ends() {
        let stats = stats();
        let two = vec![
            entry("a", "v1", 1, PoolRole::Active),
            entry("b", "v1", 1, PoolRole::Active),
        ];
        let router = Router::new(table(1, two, &stats), 1000);
        let t0 = Instant::now();
        let sessions: Vec<String> = (0..4).map(|i| format!("s{i}")).collect();
        for s in &sessions {
            router.route(0, Some(s), false, t0).unwrap();
        }
        router.swap(
            table(2, vec![entry("b", "v1", 1, PoolRole::Active)], &stats),
            t0,
        );
        assert!(router
            .machine_status()
            .iter()
            .any(|m| m.id == "a" && m.state == MachineState::Draining));
        // Sessions end by idling out; the drain completes before its deadline.
        router.sweep(t0 + Duration::from_millis(500), Duration::from_millis(100));
        assert!(router.machine_status().iter().all(|m| m.id != "a"));
    }

    #[test]
    fn jobs_an_ended_call_overtook_still_reach_its_machine() {
        let stats = stats();
        let two = vec![
            entry("a", "v1", 1, PoolRole::Active),
            entry("b", "v1", 1, PoolRole::Active),
        ];
        let router = Router::new(table(1, two, &stats), 1000);
        let t0 = Instant::now();
        let machine_of = |s: &str, ends, at| {
            router
                .route(0, Some(s), ends, at)
                .unwrap()
                .0
                .machine
                .id
                .to_string()
        };
        let calls: Vec<String> = (0..40).map(|i| format!("call{i}")).collect();
        let first: Vec<_> = calls.iter().map(|c| machine_of(c, false, t0)).collect();
        for c in &calls {
            machine_of(c, true, t0);
        }
        // Ended calls hold no session, so nothing waits for them.
        assert!(router.machine_status().iter().all(|m| m.sessions == 0));
        // A straggler sent before the end and arriving after it stays on the call's machine.
        let late = t0 + Duration::from_millis(500);
        router.sweep(late, Duration::from_secs(60));
        for (c, m) in calls.iter().zip(&first) {
            assert_eq!(&machine_of(c, false, late), m, "{c}");
        }
        // After the grace, the pins are gone.
        let later = late + ENDED_PIN_GRACE;
        router.sweep(later, Duration::from_secs(60));
        assert!(router.sessions.lock().unwrap().pins.is_empty());
    }

    #[test]
    fn new_sessions_beyond_the_cap_are_refused_and_known_ones_served() {
        let stats = stats();
        let pool = vec![
            entry("a", "v1", 1, PoolRole::Active),
            entry("s", "v2", 1, PoolRole::Simulation),
        ];
        let router = Router::new(table(1, pool, &stats), 3);
        let t0 = Instant::now();
        for i in 0..3 {
            router.route(0, Some(&format!("s{i}")), false, t0).unwrap();
        }
        assert_eq!(
            router.route(0, Some("s3"), false, t0).err(),
            Some(SessionsFull(3))
        );
        assert_eq!(
            router.route_simulation_only(Some("s4"), false, t0).err(),
            Some(SessionsFull(3))
        );
        assert!(
            router.route(0, Some("s1"), false, t0).is_ok(),
            "a known one"
        );
        assert!(router.route(0, None, false, t0).is_ok(), "no session");
        // One ends: there is room again.
        router.route(0, Some("s0"), true, t0).unwrap();
        assert!(router.route(0, Some("s3"), false, t0).is_ok());
    }
}
