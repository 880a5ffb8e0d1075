//! Finding the programs the harness starts.
//!
//! The example plugins and the floor are built into the same directory as the
//! harness itself (`target/release/` for a release build), so they are looked
//! up there rather than on `PATH`, which could hold other versions.

use std::path::PathBuf;

use anyhow::{Context as _, bail};

/// The example plugin with the `bytes` method.
pub const ECHO_PLUGIN: &str = "aurora-plugin-echo";

/// The example plugin with the `spin` method.
pub const WORDCOUNT_PLUGIN: &str = "aurora-plugin-wordcount";

/// This package's bare child.
pub const FLOOR: &str = "aurora-bench-floor";

/// Where each program the harness starts lives.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub echo: PathBuf,
    pub wordcount: PathBuf,
    pub floor: PathBuf,
}

impl Binaries {
    /// Finds every program next to the running executable.
    ///
    /// # Errors
    ///
    /// Names each missing program and the command that builds it.
    pub fn locate() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe().context("cannot tell where aurora-bench runs from")?;
        let dir = exe
            .parent()
            .context("the harness executable has no parent directory")?;

        let missing: Vec<String> = [ECHO_PLUGIN, WORDCOUNT_PLUGIN, FLOOR]
            .into_iter()
            .filter(|name| !dir.join(name).is_file())
            .map(|name| dir.join(name).display().to_string())
            .collect();
        if !missing.is_empty() {
            bail!(
                "missing {}: build every binary of the workspace first, with \
                 `cargo build --release --workspace`, then run target/release/aurora-bench",
                missing.join(" and ")
            );
        }

        Ok(Binaries {
            echo: dir.join(ECHO_PLUGIN),
            wordcount: dir.join(WORDCOUNT_PLUGIN),
            floor: dir.join(FLOOR),
        })
    }
}
