//! A manifests directory, the controller's `file:DIR` source that `meshctl enroll` also edits:
//! which files count and how each splits into YAML documents. One definition, so the editor
//! and the reader never disagree.
use std::io;
use std::path::{Path, PathBuf};

/// How deep below the directory files are still read.
pub const MAX_DEPTH: usize = 8;

/// The manifest files under `dir` in path order: `.yaml`/`.yml`, recursively, names starting
/// with `.` skipped (editors' and our own temporary files), symlinks followed (a mounted
/// ConfigMap is links). Directories that cannot be listed come back beside them.
pub fn files(dir: &Path) -> (Vec<PathBuf>, Vec<(PathBuf, io::Error)>) {
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    collect(dir, 0, &mut files, &mut unreadable);
    files.sort();
    (files, unreadable)
}

fn collect(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, unreadable: &mut Vec<(PathBuf, io::Error)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return unreadable.push((dir.to_path_buf(), e)),
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() && depth < MAX_DEPTH => collect(&path, depth + 1, files, unreadable),
            Ok(meta) if meta.is_file() && is_manifest(&path) => files.push(path),
            _ => {}
        }
    }
}

fn is_manifest(path: &Path) -> bool {
    path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml")
}

/// One document of a YAML stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Document<'a> {
    /// Its first line in the file, 0-based (the `---` marker line, after the first).
    pub first_line: usize,
    /// Its byte offset in the file.
    pub start: usize,
    pub text: &'a str,
}

/// Splits a YAML stream at `---` lines. Done here rather than by a YAML parser because those
/// give up on the rest of a stream after one malformed document.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    let mut starts = vec![(0, 0)];
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.trim().is_empty() || rest.starts_with([' ', '\t']));
        if marker && index > 0 {
            starts.push((index, offset));
        }
        offset += line.len();
    }
    let ends = starts.iter().skip(1).map(|&(_, o)| o).chain([text.len()]);
    starts
        .iter()
        .zip(ends)
        .map(|(&(first_line, start), end)| Document {
            first_line,
            start,
            text: &text[start..end],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_at_markers_only() {
        let text = "a: 1\n---\nb: 2\n--- # c\nc: '---'\n---x: 1\n";
        let docs: Vec<(usize, usize, &str)> = documents(text)
            .iter()
            .map(|d| (d.first_line, d.start, d.text))
            .collect();
        assert_eq!(
            docs,
            [
                (0, 0, "a: 1\n"),
                (1, 5, "---\nb: 2\n"),
                (3, 14, "--- # c\nc: '---'\n---x: 1\n")
            ]
        );
    }
}
