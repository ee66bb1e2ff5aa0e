//! Understudy's load generator and simulated telephony machines.
//!
//! - [`run_load`]: open-loop (or closed-loop) traffic from a [`LoadSpec`], latency measured from
//!   each job's intended send time into HDR histograms, returning a [`LoadReport`].
//! - [`spawn_machine`]: an HTTP server playing one machine of a service at a version, described
//!   by a [`MachineSpec`] (latency, errors, faults, dependencies, side effects).
//! - [`schedule`]: the pure, seeded job schedule both are built on.

pub mod calls;
pub mod load;
pub mod machine;
mod presence;
mod publish;
pub mod schedule;
pub mod spec;
#[cfg(test)]
mod spec_tests;

pub use calls::{CallStatus, LateFailureSpec};
pub use load::{
    run_load, session_id, KindReport, LatencySummary, LoadError, LoadReport, LoadSpec, Mode,
    Progress, SessionCounts, SESSION_EVENT_HEADER, SESSION_HEADER,
};
pub use machine::{
    spawn_machine, spawn_machine_with_hub, AnswerFormat, AnswerSpec, FaultSpec, FaultTrigger,
    JobsInSecond, LatencyCreepSpec, MachineError, MachineHandle, MachineSpec, MachineStats,
    SlowStartSpec, TailSpec, SIMULATION_HEADER,
};
pub use publish::{
    CallEvent, CallStateBatch, HangReport, HubOptions, HubOptionsError, CALL_STATE_TOPIC,
    MACHINE_STATE_TOPIC,
};
pub use schedule::{
    Arrivals, JobKind, JobStep, MixSpec, PlannedJob, ProfileSpec, RateCurve, Schedule,
    SchedulePlan, SessionRef, SessionShapeSpec, StepSpec,
};
pub use spec::{Delay, DelaySpec, SpecError};
