//! The box state machine: every status a box can be in and every move between them. The state
//! database is the one owner of a box's status; this module says which changes are allowed.

use serde::Serialize;

/// Where a box is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxStatus {
    /// Created, never started.
    Configured,
    Starting,
    Running,
    Stopping,
    Stopped,
    /// The last start failed; `start()` may try again.
    Failed,
    /// Its VM is being saved (`pause()`).
    Pausing,
    /// Its VM's memory and devices are saved; `resume()` (or `start()`) brings it back with
    /// its processes, `stop()` discards the saved state.
    Paused,
}

/// What happens to a box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// `start()` begins booting it.
    Start,
    /// Its agent reported ready.
    Booted,
    /// Booting failed.
    BootFailed,
    /// `stop()` begins shutting it down.
    Stop,
    /// Its engine is gone: stopped on request, or died (killed, crashed, powered off).
    EngineGone,
    /// `pause()` begins saving it.
    Pause,
    /// Its saved state is complete and its engine gone.
    Saved,
    /// `stop()` on a paused box: the saved state is thrown away.
    Discard,
}

impl BoxStatus {
    pub const ALL: [Self; 8] = [
        Self::Configured,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Failed,
        Self::Pausing,
        Self::Paused,
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Configured => "configured",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
            Self::Pausing => "pausing",
            Self::Paused => "paused",
        }
    }

    /// Whether a supervisor process should exist for a box in this status.
    pub fn has_engine(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Stopping | Self::Pausing
        )
    }

    /// The status after `event`, or `None` if the event cannot happen now.
    pub(crate) fn on(self, event: Event) -> Option<Self> {
        use BoxStatus as S;
        use Event as E;
        match (self, event) {
            (S::Configured | S::Stopped | S::Failed | S::Paused, E::Start) => Some(S::Starting),
            (S::Starting, E::Booted) => Some(S::Running),
            (S::Starting, E::BootFailed) => Some(S::Failed),
            (S::Running, E::Stop) => Some(S::Stopping),
            // A box whose engine is gone is stopped, whichever way it went.
            (S::Starting, E::EngineGone) => Some(S::Failed),
            (S::Running | S::Stopping, E::EngineGone) => Some(S::Stopped),
            (S::Running, E::Pause) => Some(S::Pausing),
            (S::Pausing, E::Saved) => Some(S::Paused),
            // A pause that did not finish lost the box's memory: it is stopped.
            (S::Pausing, E::EngineGone) => Some(S::Stopped),
            (S::Paused, E::Discard) => Some(S::Stopped),
            _ => None,
        }
    }

    /// What a recorded status means once its supervisor is known to be dead (a crash of the
    /// process that started or stopped it, or of the supervisor itself).
    pub(crate) fn after_supervisor_died(self) -> Self {
        self.on(Event::EngineGone).unwrap_or(self)
    }
}

impl std::fmt::Display for BoxStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::BoxStatus as S;
    use super::Event as E;

    #[test]
    fn names_round_trip() {
        for status in S::ALL {
            assert_eq!(S::parse(status.as_str()), Some(status));
        }
        assert_eq!(S::parse("frozen"), None);
    }

    #[test]
    fn every_transition() {
        let expected = [
            (S::Configured, E::Start, Some(S::Starting)),
            (S::Stopped, E::Start, Some(S::Starting)),
            (S::Failed, E::Start, Some(S::Starting)),
            (S::Starting, E::Start, None),
            (S::Running, E::Start, None),
            (S::Stopping, E::Start, None),
            (S::Starting, E::Booted, Some(S::Running)),
            (S::Starting, E::BootFailed, Some(S::Failed)),
            (S::Starting, E::EngineGone, Some(S::Failed)),
            (S::Running, E::Stop, Some(S::Stopping)),
            (S::Running, E::EngineGone, Some(S::Stopped)),
            (S::Stopping, E::EngineGone, Some(S::Stopped)),
            (S::Stopped, E::Stop, None),
            (S::Configured, E::Stop, None),
            (S::Stopped, E::EngineGone, None),
            (S::Configured, E::Booted, None),
            (S::Running, E::Booted, None),
            (S::Running, E::Pause, Some(S::Pausing)),
            (S::Pausing, E::Saved, Some(S::Paused)),
            (S::Pausing, E::EngineGone, Some(S::Stopped)),
            (S::Paused, E::Discard, Some(S::Stopped)),
            (S::Paused, E::Start, Some(S::Starting)),
        ];
        for (from, event, to) in expected {
            assert_eq!(from.on(event), to, "{from} on {event:?}");
        }
        // Exhaustive: every pair not listed above is refused.
        for from in S::ALL {
            for event in [
                E::Start,
                E::Booted,
                E::BootFailed,
                E::Stop,
                E::EngineGone,
                E::Pause,
                E::Saved,
                E::Discard,
            ] {
                if !expected.iter().any(|(f, e, _)| *f == from && *e == event) {
                    assert_eq!(from.on(event), None, "{from} on {event:?}");
                }
            }
        }
    }

    #[test]
    fn a_crash_mid_operation_leaves_a_restartable_box() {
        // The process that was starting, running or stopping the box died with its supervisor.
        assert_eq!(S::Starting.after_supervisor_died(), S::Failed);
        assert_eq!(S::Running.after_supervisor_died(), S::Stopped);
        assert_eq!(S::Stopping.after_supervisor_died(), S::Stopped);
        for settled in [S::Configured, S::Stopped, S::Failed] {
            assert_eq!(settled.after_supervisor_died(), settled);
            assert_eq!(settled.on(E::Start), Some(S::Starting));
        }
        for status in S::ALL {
            let recovered = status.after_supervisor_died();
            assert!(!recovered.has_engine(), "{status} -> {recovered}");
        }
    }
}
