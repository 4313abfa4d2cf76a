//! The root's files in the CA directory: `root.pem` (certificate) and `root.key` (PKCS#8,
//! mode 0600). Created on first start, never through a symbolic link or over a file already
//! there; a key others can read is refused, not fixed, because it may already have leaked;
//! a directory others can write to is refused (see [`mesh_api::secret_files`]).

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use mesh_api::secret_files;

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
        private_dir(&self.dir)?;
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

/// Whether anything is at `path`: a dangling symbolic link counts, and is refused on reading.
fn present(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Reads the root, or `None` when the directory holds none yet.
fn load(dir: &Path) -> Result<Option<RootPem>, CaError> {
    let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
    match (present(&cert_path), present(&key_path)) {
        (false, false) => return Ok(None),
        (true, false) => return Err(CaError::Incomplete { missing: key_path }),
        (false, true) => return Err(CaError::Incomplete { missing: cert_path }),
        (true, true) => {}
    }
    let key_pem = secret_files::read_secret(&key_path)?;
    let mut cert_pem = String::new();
    secret_files::open_regular(&cert_path)?
        .read_to_string(&mut cert_pem)
        .map_err(io_error(&cert_path))?;
    Ok(Some(RootPem { cert_pem, key_pem }))
}

/// Writes a new root. The certificate is renamed into place last, so a crash in between
/// leaves a directory that [`load`] reports instead of silently replacing.
fn store(dir: &Path, root: &RootPem) -> Result<(), CaError> {
    let key_tmp = write_new(dir, KEY_FILE, &root.key_pem, secret_files::SECRET_MODE)?;
    let cert_tmp = write_new(dir, CERT_FILE, &root.cert_pem, 0o644)?;
    for (tmp, name) in [(key_tmp, KEY_FILE), (cert_tmp, CERT_FILE)] {
        let path = dir.join(name);
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
    }
    Ok(())
}

/// Creates the directory private, or checks that the one there is: in a directory others
/// can write to, they could swap the key between our checks and our reads.
fn private_dir(dir: &Path) -> Result<(), CaError> {
    if !present(dir) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
    }
    Ok(secret_files::check_private_dir(dir)?)
}

fn write_new(dir: &Path, name: &str, contents: &str, mode: u32) -> Result<PathBuf, CaError> {
    let path = dir.join(format!(".{name}.new"));
    // Left by a start that crashed before its rename; removing unlinks a link, never its target.
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_error(&path)(e)),
        _ => {}
    }
    // The mode is set at creation, so the key is never readable by others, not even briefly.
    secret_files::create_new(&path, contents.as_bytes(), mode)?;
    Ok(path)
}
