//! Whether a simulated machine is up, and the one transition function that changes it: the
//! machine acts on it, its publisher reports it on the hub.

/// Whether the machine is up, as it reports itself on the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// Serving, but a slow-start fault is still warming it up.
    Starting,
    Running,
    /// Told to drain: still serving, reported `draining`.
    Draining,
    /// Crashed or shut down.
    Down,
    /// Every job hangs from now on (a `hang` fault with fraction 1 fired).
    Hung,
}

/// What changes a machine's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PresenceEvent {
    /// The slow start is over.
    Warmed,
    Drain,
    Crash,
    HangEverything,
    Shutdown,
}

impl Presence {
    pub(crate) fn is_final(self) -> bool {
        matches!(self, Presence::Down | Presence::Hung)
    }

    /// The one transition function: down and hung are final.
    pub(crate) fn next(self, event: PresenceEvent) -> Presence {
        if self.is_final() {
            return self;
        }
        match (self, event) {
            (Presence::Starting, PresenceEvent::Warmed) => Presence::Running,
            (other, PresenceEvent::Warmed) => other,
            (_, PresenceEvent::Drain) => Presence::Draining,
            (_, PresenceEvent::Crash | PresenceEvent::Shutdown) => Presence::Down,
            (_, PresenceEvent::HangEverything) => Presence::Hung,
        }
    }
}
