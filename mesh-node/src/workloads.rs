//! The local workloads file: which pods on this node are enrolled and where their cgroups are.
//! It stands in for the controller's config stream on a node run without a controller; the
//! file is re-read when it changes and a bad version never replaces the last good one.
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorkload {
    pub namespace: String,
    pub name: String,
    /// The pod's cgroup v2 directory; processes in it or below it are captured.
    pub cgroup: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadsFile {
    workloads: Vec<LocalWorkload>,
}

#[derive(Debug, Error)]
pub enum WorkloadsError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: workloads[{index}].cgroup: must be an absolute path, got {cgroup:?}")]
    RelativeCgroup {
        path: PathBuf,
        index: usize,
        cgroup: PathBuf,
    },
}

pub fn parse(path: &Path, text: &str) -> Result<Vec<LocalWorkload>, WorkloadsError> {
    let file: WorkloadsFile = serde_json::from_str(text).map_err(|source| WorkloadsError::Parse {
        path: path.to_owned(),
        source,
    })?;
    if let Some((index, w)) = file
        .workloads
        .iter()
        .enumerate()
        .find(|(_, w)| !w.cgroup.is_absolute())
    {
        return Err(WorkloadsError::RelativeCgroup {
            path: path.to_owned(),
            index,
            cgroup: w.cgroup.clone(),
        });
    }
    Ok(file.workloads)
}

/// Watches the file by its modification time and length; cheap enough to poll every second.
pub struct FileSource {
    path: PathBuf,
    /// The (mtime, length) of the last good read, `Some(None)` for a file that was absent.
    seen: Option<Option<(SystemTime, u64)>>,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self { path, seen: None }
    }

    /// `Ok(Some(..))` when the file changed since the last call and parses; `Ok(None)` when it
    /// is unchanged. A missing file means no workloads.
    pub fn poll(&mut self) -> Result<Option<Vec<LocalWorkload>>, WorkloadsError> {
        let read_err = |source| WorkloadsError::Read {
            path: self.path.clone(),
            source,
        };
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.modified().map_err(read_err)?, m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(read_err(e)),
        };
        if self.seen == Some(stamp) {
            return Ok(None);
        }
        let workloads = match stamp {
            None => Vec::new(),
            Some(_) => parse(
                &self.path,
                &std::fs::read_to_string(&self.path).map_err(read_err)?,
            )?,
        };
        // Only a good read is remembered, so a broken file is retried and reported until fixed.
        self.seen = Some(stamp);
        Ok(Some(workloads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads() {
        let w = parse(
            Path::new("w.json"),
            r#"{"workloads":[{"namespace":"shop","name":"web-0","cgroup":"/sys/fs/cgroup/kubepods/pod1"}]}"#,
        )
        .unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].name, "web-0");
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            (r#"{"workloads":[{"namespace":"a","name":"b"}]}"#, "cgroup"),
            (
                r#"{"workloads":[{"namespace":"a","name":"b","cgroup":"/x","extra":1}]}"#,
                "extra",
            ),
            (
                r#"{"workloads":[{"namespace":"a","name":"b","cgroup":"rel"}]}"#,
                "workloads[0].cgroup",
            ),
            (r#"{"workloads": 3}"#, "line 1"),
            ("not json", "w.json"),
        ] {
            let err = parse(Path::new("w.json"), text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn poll_reports_changes_and_keeps_retrying_bad_files() {
        let dir = std::env::temp_dir().join(format!("mesh-workloads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.json");
        let _ = std::fs::remove_file(&path);
        let mut src = FileSource::new(path.clone());
        assert_eq!(src.poll().unwrap(), Some(vec![]));
        assert_eq!(src.poll().unwrap(), None);
        std::fs::write(&path, "{").unwrap();
        assert!(src.poll().is_err());
        assert!(src.poll().is_err(), "a bad file is reported until fixed");
        std::fs::write(
            &path,
            r#"{"workloads":[{"namespace":"a","name":"b","cgroup":"/c"}]}"#,
        )
        .unwrap();
        assert_eq!(src.poll().unwrap().map(|w| w.len()), Some(1));
        assert_eq!(src.poll().unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
