//! The hub's tasks on the controller's state: the `machine.state` recorder and the saving of
//! each sender's sequence floor.

use super::Core;
use crate::store::StoreError;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use understudy_hub::registry::STATE_TOPIC;
pub use understudy_hub::CONTROLLER_ID;
use understudy_hub::{DisconnectReason, Filter};

/// How often the recorder saves the senders' last sequence numbers (only those that moved): a
/// write per second at most, whatever the message rate.
const SEQUENCE_SAVE_INTERVAL: Duration = Duration::from_secs(1);

impl Core {
    /// Saves the last accepted sequence number of every sender whose number moved since the last
    /// save (one transaction); returns how many were written. The recorder calls it every second
    /// and at shutdown. What a crash loses (at most the last second) is covered by the clock floor
    /// of the next start as long as the restart takes longer than `max_clock_skew_ms`.
    pub fn save_hub_sequences(&self) -> Result<usize, StoreError> {
        let changed = self.hub.unsaved_sequences();
        if changed.is_empty() {
            return Ok(0);
        }
        self.with_store(|store, _, _| {
            store.write(|tx| crate::store::save_hub_sequences(tx, &changed))
        })?;
        let count = changed.len();
        self.hub.mark_saved(changed);
        Ok(count)
    }
}

fn save_sequences(core: &Core) {
    if let Err(e) = core.save_hub_sequences() {
        tracing::warn!("saving hub sequence numbers: {e}");
    }
}

/// How long the recorder waits before subscribing again after the backend refused.
const RESUBSCRIBE_DELAY: Duration = Duration::from_secs(1);

/// Subscribes to `machine.state` through the controller's backend and records every message as a
/// registry revision until `stop`; then closes the embedded hub so SSE subscribers end. Every
/// second, and once more at the end, it saves the senders' last sequence numbers
/// ([`Core::save_hub_sequences`]).
pub fn spawn_recorder(core: Arc<Core>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    spawn_recording(core, stop, true)
}

/// [`spawn_recorder`] for one term of a leader: the hub stays open when it ends, for the next.
pub fn spawn_term_recorder(core: Arc<Core>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    spawn_recording(core, stop, false)
}

fn spawn_recording(
    core: Arc<Core>,
    mut stop: watch::Receiver<bool>,
    close_hub: bool,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let filter = Filter {
            topic: Some(STATE_TOPIC.to_string()),
            ..Filter::default()
        };
        let capacity = core.hub().settings().subscriber_queue;
        let mut save = tokio::time::interval(SEQUENCE_SAVE_INTERVAL);
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'subscribe: loop {
            let mut subscription =
                match core.hub_backend().subscribe(filter.clone(), capacity).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("registry cannot subscribe to {STATE_TOPIC}: {e}");
                        tokio::select! {
                            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => continue 'subscribe,
                            _ = stop.changed() => break 'subscribe,
                        }
                    }
                };
            loop {
                tokio::select! {
                    message = subscription.recv() => match message {
                        Some(envelope) => {
                            if let Err(e) = core.record_machine_state(&envelope) {
                                tracing::warn!(sender = %envelope.sender, "machine.state not recorded: {e}");
                            }
                        }
                        None => match subscription.disconnect_reason() {
                            Some(DisconnectReason::HubClosed) => break 'subscribe,
                            reason => {
                                // Reports lost while cut off are superseded by the next heartbeat.
                                tracing::warn!(?reason, "registry subscription ended; subscribing again");
                                continue 'subscribe;
                            }
                        },
                    },
                    _ = save.tick() => save_sequences(&core),
                    _ = stop.changed() => break 'subscribe,
                }
            }
        }
        if close_hub {
            core.hub().close();
        }
        save_sequences(&core);
    })
}
