//! The health probe loop: every `limits.health_interval`, each machine address of each running
//! config is probed once (see `health.rs`), all at the same time, and every change is logged
//! with the machines at that address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Limits;
use crate::health::probe;
use crate::pool::Machine;
use crate::service::Service;

/// Probes until the runtime it runs on is dropped.
pub(crate) async fn run(services: Vec<Arc<Service>>, limits: Limits) {
    let mut tick = tokio::time::interval(limits.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut round = tokio::task::JoinSet::new();
        for service in &services {
            for (address, machines) in targets(service) {
                let service = service.name.clone();
                let timeout = limits.health_timeout;
                round.spawn(probe_one(service, address, machines, timeout));
            }
        }
        while round.join_next().await.is_some() {}
    }
}

/// The machines of the running config by address (one probe per address, with the first
/// health path named for it).
fn targets(service: &Service) -> HashMap<SocketAddr, Vec<Arc<Machine>>> {
    let mut by_address: HashMap<SocketAddr, Vec<Arc<Machine>>> = HashMap::new();
    for machine in service.router.table().machines() {
        by_address
            .entry(machine.address)
            .or_default()
            .push(machine.clone());
    }
    by_address
}

async fn probe_one(
    service: Arc<str>,
    address: SocketAddr,
    machines: Vec<Arc<Machine>>,
    timeout: Duration,
) {
    let path = machines.iter().find_map(|m| m.health_path.clone());
    let health = &machines[0].upstream.health;
    let change = match probe(address, path.as_deref(), timeout).await {
        Ok(()) => health.passed(),
        Err(reason) => health.failed(reason),
    };
    if let Some(change) = change {
        let ids: Vec<&str> = machines.iter().map(|m| &*m.id).collect();
        change.log(&service, &ids.join(","), address);
    }
}
