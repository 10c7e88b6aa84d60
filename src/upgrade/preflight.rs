//! Everything checkable before an in-place upgrade's exec, since after a successful
//! `execve` there is no way back: the binary (the path captured at start-up) is a regular
//! executable file, and `NEWBIN --check <the master's own arguments>` exits 0 within
//! [`CHECK_TIMEOUT`], which proves it starts on this machine and accepts this
//! configuration (a new `--config` file included).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// How long `NEWBIN --check` may take: it parses flags and a file and binds nothing, so
/// seconds mean it hangs.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of its output is kept to say why it failed.
const OUTPUT_LIMIT: u64 = 4096;

/// Checks `exe` and runs `exe --check ARGS`; `Err` says why the upgrade is refused.
pub async fn check(exe: &Path, args: &[OsString]) -> Result<(), String> {
    let shown = exe.display();
    let meta = std::fs::metadata(exe).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown} is not executable"));
    }
    let mut child = tokio::process::Command::new(exe)
        .arg("--check")
        .args(args)
        .env_remove(super::handover::ENV_STATE_FD)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{shown} --check: {e}"))?;
    let mut stderr = child.stderr.take();
    let run = async {
        let mut said = String::new();
        if let Some(err) = stderr.as_mut() {
            let _ = err.take(OUTPUT_LIMIT).read_to_string(&mut said).await;
        }
        (child.wait().await, said)
    };
    let (status, said) = tokio::time::timeout(CHECK_TIMEOUT, run)
        .await
        .map_err(|_| format!("{shown} --check did not finish within {CHECK_TIMEOUT:?}"))?;
    let status = status.map_err(|e| format!("{shown} --check: {e}"))?;
    if status.success() {
        return Ok(());
    }
    let last = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "{shown} --check failed ({status}): {}",
        last.trim()
    ))
}
