//! Understudy's state channel and cluster model (issue 6): signed envelopes and their verifier,
//! the embedded pub-sub hub and its HTTP transport, the machine registry model, the monitor's
//! when/then rules and a release's sub-group selection. Everything here is self-contained; the
//! controller wires it to its HTTP port and its SQLite store (see docs/hub.md).

pub mod envelope;
pub mod http;
pub mod hub;
pub mod monitor;
pub mod nats;
pub mod registry;
pub mod subgroup;

pub use envelope::{
    canonical_bytes, ControllerVerifier, Envelope, Keyring, Rejection, SecretKey, Signer, Verifier,
    CONFIG_TOPIC, CONTROLLER_ID, READ_AUTH_HEADER, READ_TOPIC,
};
pub use hub::{Backend, BackendError, DisconnectReason, EmbeddedHub, Filter, Subscription};
pub use monitor::{
    evaluate, Action, ActualState, DesiredService, DesiredState, ObservedMachine, Rules,
};
pub use registry::{
    MachineFilter, MachineRecord, MachineStore, MachineUpdate, MemoryStore, Role, Status,
};
pub use subgroup::{Subgroup, SubgroupSpec};
