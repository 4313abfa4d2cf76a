//! The CA directory and its key files against what others could plant in them.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::time::Duration;

use mesh_api::secret_files::SecretFileError;

use super::{Ca, CaError};

const DAY: Duration = Duration::from_secs(24 * 3600);

#[test]
fn a_symlink_planted_at_the_key_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    fs::create_dir(&ca_dir).unwrap();
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700)).unwrap();
    // Before the first start: the new key would be written wherever the link points.
    let elsewhere = dir.path().join("stolen.key");
    symlink(&elsewhere, ca_dir.join("root.key")).unwrap();
    symlink(dir.path().join("stolen.pem"), ca_dir.join("root.pem")).unwrap();
    let err = Ca::load_or_create(&ca_dir, DAY).err().expect("refused");
    assert!(
        matches!(&err, CaError::File(SecretFileError::Symlink { path }) if path.ends_with("root.key")),
        "{err}"
    );
    assert!(!elsewhere.exists(), "nothing written through the link");

    // After: a root exists, and its key is swapped for a link to another one.
    fs::remove_file(ca_dir.join("root.key")).unwrap();
    fs::remove_file(ca_dir.join("root.pem")).unwrap();
    Ca::load_or_create(&ca_dir, DAY).unwrap();
    fs::rename(ca_dir.join("root.key"), &elsewhere).unwrap();
    symlink(&elsewhere, ca_dir.join("root.key")).unwrap();
    let err = Ca::load_or_create(&ca_dir, DAY).err().expect("refused");
    assert!(
        matches!(&err, CaError::File(SecretFileError::Symlink { .. })),
        "{err}"
    );
}

#[test]
fn new_files_are_private_and_never_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // A stale temporary file from a start that crashed is replaced, a link there is not followed.
    fs::create_dir(&ca_dir).unwrap();
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    symlink(&elsewhere, ca_dir.join(".root.key.new")).unwrap();
    Ca::load_or_create(&ca_dir, DAY).unwrap();
    assert!(!elsewhere.exists());
    let key = fs::symlink_metadata(ca_dir.join("root.key")).unwrap();
    assert!(key.is_file());
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(&ca_dir).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_ca_directory_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    Ca::load_or_create(&ca_dir, DAY).unwrap();
    for mode in [0o777, 0o770, 0o702] {
        fs::set_permissions(&ca_dir, fs::Permissions::from_mode(mode)).unwrap();
        let err = Ca::load_or_create(&ca_dir, DAY).err().expect("refused");
        assert!(
            matches!(&err, CaError::File(SecretFileError::DirWritable { .. })),
            "{mode:o}: {err}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&ca_dir.display().to_string()) && text.contains("chmod go-w"),
            "{text}"
        );
    }
    fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o750)).unwrap();
    Ca::load_or_create(&ca_dir, DAY).unwrap();
}
