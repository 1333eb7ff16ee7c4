//! The ways the stand-in agent misbehaves.

/// One way to break the protocol (names as written in a hostname or the mode file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Speaks the protocol correctly.
    Polite,
    // Before Configure (from the mode file only):
    /// Opens the port and never says `Ready`.
    NeverReady,
    /// Sends garbage instead of `Ready`.
    GarbageAtBoot,
    /// Says `Ready` with another protocol version.
    WrongVersion,
    /// Says `Ready` twice.
    ReadyTwice,
    /// Says `Ready`, then PID 1 exits (the VM ends).
    ExitAfterReady,
    /// Says `Ready`, then never reads or writes again.
    SilentAfterReady,
    // On an exec of `misbehave` (chosen by the hostname):
    /// Answers with random bytes.
    Garbage,
    /// Sends a header announcing a 4 GiB frame.
    OversizedHeader,
    /// Replies on a channel that was never opened.
    ForgedId,
    /// Sends output far past its credit.
    Flood,
    /// Sends thousands of control messages on the exec's channel.
    ControlFlood,
    /// Grants more stdin credit than the window.
    BadCredit,
    /// Says `Ready` again on channel 0.
    ReadyAgain,
    /// Stops reading and writing altogether (a frozen agent).
    Freeze,
    /// Never answers the exec, still answers pings.
    ExecNoStart,
    /// Starts the exec and never reports its end, whatever its timeout.
    ExecNoExit,
    /// Never answers `Metrics`.
    MetricsSilent,
    /// Never answers a copy.
    CopySilent,
}

const NAMES: &[(&str, Mode)] = &[
    ("polite", Mode::Polite),
    ("never-ready", Mode::NeverReady),
    ("garbage-at-boot", Mode::GarbageAtBoot),
    ("wrong-version", Mode::WrongVersion),
    ("ready-twice", Mode::ReadyTwice),
    ("exit-after-ready", Mode::ExitAfterReady),
    ("silent-after-ready", Mode::SilentAfterReady),
    ("garbage", Mode::Garbage),
    ("oversized-header", Mode::OversizedHeader),
    ("forged-id", Mode::ForgedId),
    ("flood", Mode::Flood),
    ("control-flood", Mode::ControlFlood),
    ("bad-credit", Mode::BadCredit),
    ("ready-again", Mode::ReadyAgain),
    ("freeze", Mode::Freeze),
    ("exec-no-start", Mode::ExecNoStart),
    ("exec-no-exit", Mode::ExecNoExit),
    ("metrics-silent", Mode::MetricsSilent),
    ("copy-silent", Mode::CopySilent),
];

impl Mode {
    pub fn parse(name: &str) -> Option<Self> {
        NAMES.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }

    /// The mode a box name asks for: its part before the first `.` (so `garbage.2` is
    /// `garbage`); anything unknown is `Polite`.
    pub fn from_hostname(hostname: &str) -> Self {
        let name = hostname.split('.').next().unwrap_or("");
        Self::parse(name)
            .filter(|m| !m.before_configure())
            .unwrap_or(Mode::Polite)
    }

    /// Modes that act before the host sends anything, so only a mode file can choose them.
    pub fn before_configure(self) -> bool {
        matches!(
            self,
            Mode::NeverReady
                | Mode::GarbageAtBoot
                | Mode::WrongVersion
                | Mode::ReadyTwice
                | Mode::ExitAfterReady
                | Mode::SilentAfterReady
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hostnames() {
        for (name, mode) in NAMES {
            assert_eq!(Mode::parse(name), Some(*mode));
        }
        assert_eq!(Mode::from_hostname("garbage"), Mode::Garbage);
        assert_eq!(Mode::from_hostname("exec-no-exit.3"), Mode::ExecNoExit);
        assert_eq!(
            Mode::from_hostname("01J0000000000000000000000"),
            Mode::Polite
        );
        // A pre-Configure mode cannot be asked for by name: it would be too late.
        assert_eq!(Mode::from_hostname("never-ready"), Mode::Polite);
    }
}
