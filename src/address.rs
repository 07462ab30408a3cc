//! The proxy's address on its device (`lo` by default): added at start unless it is there
//! already, removed at exit when we added it. Runs `ip` (through [`exec`]).

use std::fmt;
use std::net::IpAddr;

use crate::exec;
use crate::listen::host_prefix;

/// `ip addr` could not be run or failed; the message names the command and the device.
#[derive(Debug)]
pub struct AddressError {
    pub message: String,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for AddressError {}

fn run_ip(args: &[&str]) -> Result<std::process::Output, AddressError> {
    exec::run("ip", args, None).map_err(|e| AddressError { message: format!("cannot run ip: {e}") })
}

/// Put `ip` (/32 or /128) on `device`. Returns `true` when it was added now, `false` when it was
/// already there (then it is not ours to remove).
pub fn ensure_address(device: &str, ip: IpAddr) -> Result<bool, AddressError> {
    let fam = if ip.is_ipv4() { "-4" } else { "-6" };
    let shown = run_ip(&[fam, "-o", "addr", "show", "dev", device])?;
    if !shown.status.success() {
        return Err(AddressError {
            message: format!("device {device:?}: {}", String::from_utf8_lossy(&shown.stderr).trim()),
        });
    }
    let want = host_prefix(&ip);
    if String::from_utf8_lossy(&shown.stdout).split_whitespace().any(|w| w == want) {
        return Ok(false);
    }
    let out = run_ip(&["addr", "add", &want, "dev", device])?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("File exists") {
            return Ok(false);
        }
        return Err(AddressError { message: format!("ip addr add {want} dev {device}: {}", stderr.trim()) });
    }
    Ok(true)
}

/// Take `ip` off `device` (at exit, when [`ensure_address`] added it).
pub fn remove_address(device: &str, ip: IpAddr) -> Result<(), AddressError> {
    let want = host_prefix(&ip);
    let out = run_ip(&["addr", "del", &want, "dev", device])?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("Cannot assign") {
            return Err(AddressError { message: format!("ip addr del {want} dev {device}: {}", stderr.trim()) });
        }
    }
    Ok(())
}
