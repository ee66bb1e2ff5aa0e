//! How a command ends: its error carries the message for stderr and the exit code, so every
//! command returns a `Result` and [`exit_code`] alone prints and maps it.

use crate::api::client::ClientError;

/// A command that did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// Bad use: a bad file, flag or request (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Refused or not done: an endpoint that said no or could not be reached (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The command printed its own outcome and ends with this code (a judgement that failed,
    /// a scenario whose outcome was unexpected).
    #[error("exit {0}")]
    Exit(u8),
}

pub type CliResult = Result<(), CliError>;

impl CliError {
    pub fn usage(message: impl Into<String>) -> CliError {
        CliError::Usage(message.into())
    }

    /// The exit code: 2 bad use, 1 refused or not done, or the command's own.
    pub fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Failed(_) => 1,
            CliError::Exit(code) => *code,
        }
    }

    /// A command that reports an exit code itself: 0 is success.
    pub fn from_code(code: u8) -> CliResult {
        match code {
            0 => Ok(()),
            code => Err(CliError::Exit(code)),
        }
    }
}

/// A client error: a 400 (or a URL that cannot be used) is bad use, anything else refused or not
/// done.
impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let message = format!("error: {e}");
        match e {
            ClientError::Refused { status: 400, .. } | ClientError::BadUrl { .. } => {
                CliError::Usage(message)
            }
            _ => CliError::Failed(message),
        }
    }
}

/// Prints a failed command's message on stderr and gives the process's exit code.
pub fn exit_code(result: CliResult) -> u8 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            if !matches!(e, CliError::Exit(_)) {
                eprintln!("{e}");
            }
            e.code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_exit_code() {
        assert_eq!(exit_code(Ok(())), 0);
        assert_eq!(exit_code(Err(CliError::usage("bad flag"))), 2);
        assert_eq!(exit_code(Err(CliError::Failed("down".into()))), 1);
        assert_eq!(exit_code(Err(CliError::Exit(3))), 3);
        assert_eq!(CliError::from_code(0), Ok(()));
        assert_eq!(CliError::from_code(1), Err(CliError::Exit(1)));
        let refused = ClientError::Refused {
            status: 400,
            message: "bad".into(),
        };
        assert_eq!(CliError::from(refused).code(), 2);
        let conflict = ClientError::Refused {
            status: 409,
            message: "busy".into(),
        };
        assert_eq!(CliError::from(conflict).code(), 1);
    }
}
