//! The monitor loop: each reconcile tick compares what the controller wants (its
//! balancer configs and machine roles) with what is observed (the machine registry's latest
//! reports and the balancers' stats), asks `understudy_hub::evaluate` which rules apply, and acts:
//!
//! - an active machine is down: it is taken out of its balancer (a new config version, committed
//!   before it is pushed, like every config); with a scaling threshold a replacement is asked for
//!   on the hub topic `control.scale` (the controller provisions nothing itself);
//! - a running machine that belongs in its balancer is missing from it: it is put back;
//! - a machine runs another version than its declared one: drift is reported (and, when the rules
//!   say `update_version`, it is taken out and an update asked for on `control.update`).
//!
//! The rules are evaluated without memory of earlier ticks: what must last (which machines the
//! monitor took out, since when) is state, kept in SQLite (`monitor_held_out`) and read back on
//! start. A machine holding sessions is drained first (taken out of the config: its balancer sends
//! it no new session and keeps the ones it holds), and altered only once its sessions ended (the
//! balancer dropped it, or it reports none) or the rules' drain timeout passed.
//!
//! Every action is logged, counted in `understudy_monitor_actions_total{rule,action}` and listed
//! at `GET /api/v1/monitor/actions` (the most recent [`RECENT_ACTIONS`]). An action asked for
//! again on the next tick (the same drift, the same shortage) is not logged or counted again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Serialize;
use understudy_hub::monitor::Action;
use understudy_hub::Signer;
use utoipa::ToSchema;

use crate::core::monitor::{ActionRecord, HeldOut, HoldReason};

/// Topic of replacement requests (payload `{"service", "missing", "machines_down"}`).
pub const SCALE_TOPIC: &str = "control.scale";
/// Topic of version update requests (payload `{"service", "machine", "to_version"}`).
pub const UPDATE_TOPIC: &str = "control.update";
/// How many actions `GET /api/v1/monitor/actions` keeps.
pub const RECENT_ACTIONS: usize = 256;

/// The monitor's part of the controller state.
#[derive(Default)]
pub struct MonitorState {
    pub(crate) held_out: BTreeMap<String, HeldOut>,
    pub(crate) recent: VecDeque<ActionRecord>,
    /// What the previous tick asked for ([`repeat_key`]): asked again, it is not logged, counted
    /// or listed again.
    pub(crate) previous: BTreeSet<Action>,
    pub(crate) next_seq: u64,
    /// Signs what the controller publishes on `control.*` topics.
    pub(crate) signer: Option<Signer>,
}

/// A message for the hub, published once the state lock is released.
pub struct Outbound {
    pub(crate) topic: &'static str,
    pub(crate) payload: serde_json::Value,
}

/// `GET /api/v1/monitor`: where the monitor stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MonitorView {
    pub drain_timeout_ms: u64,
    /// Machines the monitor took out of their balancer.
    pub held_out: BTreeMap<String, HeldOut>,
    /// Every machine a balancer drains or the monitor holds out, with the sessions it holds.
    pub machines: Vec<MachinePresence>,
}

/// A machine's place on its balancer as the controller last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct MachinePresence {
    pub id: String,
    pub service: String,
    /// `serving`, `draining` (no new session; keeps its calls) or `absent` from the balancer.
    pub state: &'static str,
    /// Sessions its balancer has pinned to it.
    pub balancer_sessions: Option<u64>,
    /// Sessions it reported itself (machine registry).
    pub reported_sessions: Option<u32>,
    pub held_out: Option<HoldReason>,
}
