//! Balancer-facing tables of the cluster file: each balancer's secret key (read from its key
//! file) and how its configs are delivered.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use understudy_hub::SecretKey;

/// A balancer's secret key as the controller holds it. `Debug` never shows the key.
#[derive(Clone)]
pub struct BalancerSecret {
    key: SecretKey,
    /// Where it was read from; a rotated key is written back there.
    file: Option<PathBuf>,
}

impl BalancerSecret {
    /// Reads a key file (base64, as the balancer's `--key-file`).
    pub fn from_file(path: &Path) -> Result<BalancerSecret, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
        let key = SecretKey::from_base64(&text)
            .map_err(|e| format!("key file {}: {e}", path.display()))?;
        Ok(BalancerSecret {
            key,
            file: Some(path.to_path_buf()),
        })
    }

    /// A key handed over in memory (the scenario runner generates one per balancer).
    pub fn given(key: SecretKey) -> BalancerSecret {
        BalancerSecret { key, file: None }
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl std::fmt::Debug for BalancerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalancerSecret")
            .field("key", &self.key)
            .field("file", &self.file)
            .finish()
    }
}

impl PartialEq for BalancerSecret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        let same_key: bool = self
            .key
            .to_base64()
            .as_bytes()
            .ct_eq(other.key.to_base64().as_bytes())
            .into();
        same_key && self.file == other.file
    }
}

/// How a signed config reaches its balancer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigDelivery {
    /// `PUT` on the balancer's admin port.
    #[default]
    Http,
    /// Published on the controller's hub (topic `control.balancer-config`); the balancer
    /// subscribes to it (`--config-feed-hub` / `--config-feed-nats`).
    Hub,
}
