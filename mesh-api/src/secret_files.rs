//! Files that hold secrets (keys, node tokens) and the directories they live in.
//!
//! A secret file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` and mode 0600 from the
//! start: it never exists with a wider mode, and a file or symbolic link planted at its path
//! makes the creation fail instead of writing the secret wherever the link points. Reading
//! also refuses symbolic links, and a file others may read. None of this holds in a directory
//! others can write to (they could swap files between our checks and our use), so such a
//! directory is refused as a whole, with the command that fixes it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The mode of every secret file this module creates.
pub const SECRET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} already exists; refusing to overwrite a secret (remove it if it is stale)", path.display())]
    Exists { path: PathBuf },
    #[error("{} is a symbolic link; a secret is only read from or written to a regular file (replace the link by the file)", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{} has mode {mode:04o}: a secret must be readable by its owner only (chmod 600 {})", path.display(), path.display())]
    Readable { path: PathBuf, mode: u32 },
    #[error("{} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("{} has mode {mode:04o}: others can write to this directory of secrets (fix: chmod go-w {})", path.display(), path.display())]
    DirWritable { path: PathBuf, mode: u32 },
    #[error("{} is owned by uid {owner}, not by this process (uid {uid}): others could replace the secrets in it (fix: chown {uid} {})", path.display(), path.display())]
    DirNotOurs { path: PathBuf, owner: u32, uid: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecretFileError + '_ {
    move |source| match source.raw_os_error() {
        // O_NOFOLLOW on a symbolic link.
        Some(libc::ELOOP) => SecretFileError::Symlink {
            path: path.to_owned(),
        },
        _ if source.kind() == std::io::ErrorKind::AlreadyExists => SecretFileError::Exists {
            path: path.to_owned(),
        },
        _ => SecretFileError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Refuses a directory of secrets that others could change: one with the group or other
/// write bit, or owned by another user than this process (root may use a directory it owns).
pub fn check_private_dir(path: &Path) -> Result<(), SecretFileError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_dir() {
        return Err(SecretFileError::NotADirectory {
            path: path.to_owned(),
        });
    }
    let uid = effective_uid();
    if meta.uid() != uid {
        return Err(SecretFileError::DirNotOurs {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SecretFileError::DirWritable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates `path` with `contents`, mode `mode`, failing if anything (a file, a symbolic link)
/// is already there. The contents are on disk when this returns.
pub fn create_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), SecretFileError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(path)
        .map_err(|e| match io(path)(e) {
            // Say what is in the way when it is a link: someone may be redirecting the secret.
            SecretFileError::Exists { path } if path.symlink_metadata().is_ok_and(|m| m.is_symlink()) => {
                SecretFileError::Symlink { path }
            }
            other => other,
        })?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// [`create_new`] with [`SECRET_MODE`].
pub fn create_secret(path: &Path, contents: &[u8]) -> Result<(), SecretFileError> {
    create_new(path, contents, SECRET_MODE)
}

/// Reads a secret: a regular file, not a symbolic link, that only its owner may read.
pub fn read_secret(path: &Path) -> Result<String, SecretFileError> {
    let mut file = open_regular(path)?;
    let mode = file.metadata().map_err(io(path))?.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Readable {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io(path))?;
    Ok(text)
}

/// Opens a regular file for reading, refusing a symbolic link at `path`.
pub fn open_regular(path: &Path) -> Result<File, SecretFileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io(path))?;
    if !file.metadata().map_err(io(path))?.is_file() {
        return Err(SecretFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_secret_is_created_private_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_secret(&path, b"s3cret").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(read_secret(&path).unwrap(), "s3cret");
        let again = create_secret(&path, b"other").unwrap_err();
        assert!(matches!(again, SecretFileError::Exists { .. }), "{again}");

        // A link planted at the path, pointing where the secret must not go.
        let target = dir.path().join("elsewhere");
        let link = dir.path().join("planted");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = create_secret(&link, b"s3cret").unwrap_err();
        assert!(matches!(err, SecretFileError::Symlink { .. }), "{err}");
        assert!(!target.exists(), "nothing written through the link");
        std::os::unix::fs::symlink(&path, dir.path().join("to-key")).unwrap();
        let err = read_secret(&dir.path().join("to-key")).unwrap_err();
        assert!(matches!(err, SecretFileError::Symlink { .. }), "{err}");
    }

    #[test]
    fn a_secret_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        create_secret(&path, b"s3cret").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let err = read_secret(&path).unwrap_err();
        assert!(
            matches!(err, SecretFileError::Readable { mode: 0o640, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        check_private_dir(dir.path()).unwrap();
        for mode in [0o777, 0o1777, 0o775, 0o757] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let err = check_private_dir(dir.path()).unwrap_err();
            assert!(
                matches!(err, SecretFileError::DirWritable { .. }),
                "{mode:o}: {err}"
            );
            let text = err.to_string();
            assert!(
                text.contains(&dir.path().display().to_string()) && text.contains("chmod go-w"),
                "{text}"
            );
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        check_private_dir(dir.path()).unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            check_private_dir(&file),
            Err(SecretFileError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        assert_eq!(effective_uid(), 0, "giving a directory away needs root");
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let err = check_private_dir(dir.path()).unwrap_err();
        assert!(
            matches!(
                err,
                SecretFileError::DirNotOurs {
                    owner: 65534,
                    uid: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("chown 0"), "{err}");
    }
}
