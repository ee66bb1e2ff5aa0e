//! The highest fencing epoch a balancer applied, kept in a file (`[[balancers]] epoch_file`) so a
//! restarted balancer still refuses the configs of a controller that lost its lead.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the stored floor cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    #[error("epoch file {path}: {reason}")]
    Io { path: String, reason: String },
}

fn io_error(path: &Path, reason: impl std::fmt::Display) -> FloorError {
    FloorError::Io {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Where a balancer keeps its floor (nowhere: in memory only) and the floor read at start.
#[derive(Debug, Clone, Default)]
pub struct EpochFloor {
    path: Option<PathBuf>,
    stored: u64,
}

impl EpochFloor {
    /// Reads the floor at `path`; a missing file is a floor of 0 (a first start), anything but
    /// one decimal number is an error naming the file.
    pub fn open(path: Option<PathBuf>) -> Result<EpochFloor, FloorError> {
        let Some(path) = path else {
            return Ok(EpochFloor::default());
        };
        let stored = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|e| io_error(&path, format!("not an epoch number ({e})")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error(&path, e)),
        };
        Ok(EpochFloor {
            path: Some(path),
            stored,
        })
    }

    /// The floor read at start.
    pub fn stored(&self) -> u64 {
        self.stored
    }

    /// Records `epoch` as the floor before it is applied: written to a temporary file, synced
    /// and renamed over the old one, so a crash leaves the old floor or the new, never neither.
    pub fn save(&self, epoch: u64) -> Result<(), FloorError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let temporary = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            writeln!(file, "{epoch}")?;
            file.sync_all()?;
            std::fs::rename(&temporary, path)
        };
        write().map_err(|e| io_error(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_survives_a_restart_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("media.epoch");
        let floor = EpochFloor::open(Some(path.clone())).unwrap();
        assert_eq!(floor.stored(), 0, "a first start");
        floor.save(131_072).unwrap();
        assert_eq!(
            EpochFloor::open(Some(path.clone())).unwrap().stored(),
            131_072
        );
        std::fs::write(&path, "twelve\n").unwrap();
        let err = EpochFloor::open(Some(path)).unwrap_err().to_string();
        assert!(
            err.contains("media.epoch") && err.contains("not an epoch"),
            "{err}"
        );
        assert_eq!(EpochFloor::open(None).unwrap().stored(), 0);
    }
}
