//! Files only the service's own user may read: the data dir holds every user's conversations
//! and the token signing key, so it is created `0700` and the database files `0600` (on Unix;
//! elsewhere the platform's defaults apply).

use std::path::Path;

use crate::Result;

/// Creates `dir` (and any missing parents) `0700` if it does not exist. An existing directory
/// keeps its mode: it may be one the operator chose to share (a home directory, say), and the
/// files inside are `0600` anyway.
pub fn private_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    Ok(())
}

/// Makes `file` `0600`, creating it empty if it does not exist.
pub fn private_file(file: &Path) -> Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(file)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
