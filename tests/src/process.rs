//! Child processes that never outlive the test: killed on drop, and by a watchdog shell
//! if the test process dies first.

use anyhow::Context as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Process {
    name: String,
    child: Child,
    watchdog: Option<Child>,
}

// === impl Process ===

impl Process {
    /// Spawns `command` with output appended to `log`.
    pub fn spawn(name: &str, command: Command, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_cleanup(name, command, log, None)
    }

    /// Like [`Process::spawn`]; the watchdog also removes `cleanup` after the kill (for
    /// per-process servers whose owner is a static that never drops).
    pub fn spawn_with_cleanup(
        name: &str,
        mut command: Command,
        log: &Path,
        cleanup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; kill -9 {child} 2>/dev/null; {cleanup}",
                parent = std::process::id(),
                child = child.id(),
                cleanup = cleanup
                    .map(|dir| format!("sleep 0.5; rm -rf '{}'", dir.display()))
                    .unwrap_or_default()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Ok(Self {
            name: name.to_owned(),
            child,
            watchdog,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: std::time::Duration) {
        if !self.running() {
            return;
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop(std::time::Duration::from_secs(3));
        if let Some(watchdog) = &mut self.watchdog {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}
