//! The root's files in the CA directory: `root.pem` (certificate) and `root.key` (PKCS#8,
//! mode 0600). Created on first start; a key others can read is refused, not fixed, because
//! it may already have leaked.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{CaError, RootPem, RootStore};

pub(super) const CERT_FILE: &str = "root.pem";
pub(super) const KEY_FILE: &str = "root.key";

/// The root in a directory (local mode). One controller per directory: files have no
/// create-if-absent across hosts, which is what the Secret store is for.
pub struct FilesRoot {
    dir: PathBuf,
}

impl FilesRoot {
    pub fn new(dir: PathBuf) -> Self {
        FilesRoot { dir }
    }

    pub(super) fn load_or_store_now(
        &self,
        create: &dyn Fn() -> Result<RootPem, CaError>,
    ) -> Result<(RootPem, bool), CaError> {
        if let Some(root) = load(&self.dir)? {
            return Ok((root, false));
        }
        let root = create()?;
        store(&self.dir, &root)?;
        Ok((root, true))
    }
}

impl RootStore for FilesRoot {
    fn location(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    async fn load_or_store(
        &self,
        create: &(dyn Fn() -> Result<RootPem, CaError> + Sync),
    ) -> Result<(RootPem, bool), CaError> {
        self.load_or_store_now(create)
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads the root, or `None` when the directory holds none yet.
fn load(dir: &Path) -> Result<Option<RootPem>, CaError> {
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    match (cert_path.exists(), key_path.exists()) {
        (false, false) => return Ok(None),
        (true, false) => return Err(CaError::Incomplete { missing: key_path }),
        (false, true) => return Err(CaError::Incomplete { missing: cert_path }),
        (true, true) => {}
    }
    let mode = fs::metadata(&key_path)
        .map_err(io_error(&key_path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: key_path,
            mode: mode & 0o777,
        });
    }
    Ok(Some(RootPem {
        cert_pem: fs::read_to_string(&cert_path).map_err(io_error(&cert_path))?,
        key_pem: fs::read_to_string(&key_path).map_err(io_error(&key_path))?,
    }))
}

/// Writes a new root. The certificate is renamed into place last, so a crash in between
/// leaves a directory that [`load`] reports instead of silently replacing.
fn store(dir: &Path, root: &RootPem) -> Result<(), CaError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error(dir))?;
    let key_tmp = write_new(dir, KEY_FILE, &root.key_pem, 0o600)?;
    let cert_tmp = write_new(dir, CERT_FILE, &root.cert_pem, 0o644)?;
    for (tmp, name) in [(key_tmp, KEY_FILE), (cert_tmp, CERT_FILE)] {
        let path = dir.join(name);
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
    }
    Ok(())
}

fn write_new(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<PathBuf, CaError> {
    let path = dir.join(format!(".{name}.new"));
    // The mode is set at creation, so the key is never readable by others, not even briefly.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(io_error(&path))?;
    file.write_all(contents.as_bytes()).map_err(io_error(&path))?;
    file.sync_all().map_err(io_error(&path))?;
    Ok(path)
}
