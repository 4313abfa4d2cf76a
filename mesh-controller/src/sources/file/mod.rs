//! The local-file source: a directory of Kubernetes YAML (the objects a cluster would hold),
//! read recursively and reloaded whenever something in it changes.
//!
//! Files ending in `.yaml` or `.yml` are read; names starting with `.` are skipped (editor
//! swap files, and the `..data` directories of a mounted ConfigMap, whose visible names
//! are symlinks into them). Changes are seen through inotify (polling when inotify is not
//! available) and loaded once they have been quiet for [`DEBOUNCE`].

mod parse;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use self::parse::Loader;
use super::Source;
use crate::cluster::ClusterState;
use crate::store::Store;

/// Quiet time after the last change before loading: one save is often several events.
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// Load at the latest this long after the first change, even if changes keep coming.
const MAX_DELAY: Duration = Duration::from_millis(500);
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Symlinked directories could loop; real layouts are shallow.

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("{}: not a readable directory: {source}", path.display())]
    Dir { path: PathBuf, source: std::io::Error },
    #[error("watching {}: {source}", path.display())]
    Watch { path: PathBuf, source: notify::Error },
}

pub struct FileSource {
    dir: PathBuf,
}

impl FileSource {
    pub fn new(dir: PathBuf) -> Result<Self, FileSourceError> {
        std::fs::read_dir(&dir).map_err(|source| FileSourceError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(FileSource { dir })
    }

    fn watch(&self, tx: mpsc::UnboundedSender<Event>) -> Result<Box<dyn Watcher + Send>, FileSourceError> {
        let handler = move |event: notify::Result<Event>| match event {
            // Our own reads show up as access events; reacting to them would loop.
            Ok(e) if matches!(e.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) => {}
            Ok(e) => {
                let _ = tx.send(e);
            }
            Err(e) => tracing::warn!(error = %e, "file watch error"),
        };
        let watch_error = |source| FileSourceError::Watch {
            path: self.dir.clone(),
            source,
        };
        let mut watcher: Box<dyn Watcher + Send> = match notify::recommended_watcher(handler.clone()) {
            Ok(w) => Box::new(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; polling the directory");
                let config = notify::Config::default().with_poll_interval(POLL_INTERVAL);
                Box::new(notify::PollWatcher::new(handler, config).map_err(watch_error)?)
            }
        };
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(watch_error)?;
        Ok(watcher)
    }

    async fn reload(&self, store: &Store) {
        let dir = self.dir.clone();
        let Ok(state) = tokio::task::spawn_blocking(move || load(&dir)).await else {
            tracing::error!("loading the cluster state panicked; keeping the last one");
            return;
        };
        if let Some(version) = store.publish(state) {
            tracing::info!(version, dir = %self.dir.display(), "cluster state changed");
        }
    }
}

impl Source for FileSource {
    type Error = FileSourceError;

    async fn run(self, store: Arc<Store>) -> Result<(), FileSourceError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Watch before the first load, so no change between the two goes unseen.
        let _watcher = self.watch(tx)?;
        self.reload(&store).await;
        while rx.recv().await.is_some() {
            let first = Instant::now();
            while first.elapsed() < MAX_DELAY {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return Ok(()),
                    Err(_quiet) => break,
                }
            }
            self.reload(&store).await;
        }
        Ok(())
    }
}

/// Reads every manifest under `dir`; problems are logged, their objects left out (policies:
/// replaced by their fail-closed stand-ins).
fn load(dir: &Path) -> ClusterState {
    let (files, unreadable) = mesh_api::manifests::files(dir);
    for (dir, e) in unreadable {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot list directory");
    }
    let mut loader = Loader::default();
    for path in &files {
        let name = path.strip_prefix(dir).unwrap_or(path).display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => loader.add_file(&name, &text),
            Err(e) => tracing::warn!(file = %name, error = %e, "cannot read manifest; skipped"),
        }
    }
    let (state, problems) = loader.finish();
    for p in &problems {
        tracing::warn!(
            file = %p.file,
            line = p.line,
            object = p.object.as_deref().unwrap_or("?"),
            field = p.field.as_deref().unwrap_or("-"),
            "{}; {}",
            p.message,
            p.fail_closed.unwrap_or("skipped")
        );
    }
    tracing::debug!(
        files = files.len(),
        problems = problems.len(),
        pods = state.pods.len(),
        services = state.services.len(),
        policies = state.policies.len(),
        "loaded manifests"
    );
    state
}
