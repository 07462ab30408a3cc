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
    // IPv6: `nodad`, so the address is usable at once (not "tentative" for a second or two,
    // during which binding it fails with "Address not available").
    let out = match ip {
        IpAddr::V4(_) => run_ip(&["addr", "add", &want, "dev", device])?,
        IpAddr::V6(_) => run_ip(&["addr", "add", &want, "dev", device, "nodad"])?,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("File exists") {
            return Ok(false);
        }
        return Err(AddressError { message: format!("ip addr add {want} dev {device}: {}", stderr.trim()) });
    }
    Ok(true)
}

/// The devices that hold `ip` (any prefix length), as `ip -o addr show` lists them.
pub fn devices_holding(ip: IpAddr) -> Result<Vec<String>, AddressError> {
    let out = run_ip(&["-o", "addr", "show"])?;
    if !out.status.success() {
        return Err(AddressError {
            message: format!("ip -o addr show: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(holders(&String::from_utf8_lossy(&out.stdout), ip))
}

/// [`devices_holding`] on `ip -o addr show` output (`N: dev    inet A/L ...`).
fn holders(listing: &str, ip: IpAddr) -> Vec<String> {
    let mut devices: Vec<String> = listing
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let dev = words.nth(1)?.trim_end_matches(':');
            let addr = words.skip_while(|w| *w != "inet" && *w != "inet6").nth(1)?;
            let host = addr.split('/').next()?;
            (host.parse::<IpAddr>().ok()? == ip).then(|| dev.split('@').next().unwrap_or(dev).to_string())
        })
        .collect();
    devices.dedup();
    devices
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_are_read_from_the_listing() {
        let listing = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
1: lo    inet 169.254.96.16/32 scope global lo\\       valid_lft forever preferred_lft forever
7: edgemesh0    inet 169.254.96.16/24 brd 169.254.96.255 scope global edgemesh0\\       valid_lft forever
1: lo    inet6 fd00:e16e::16/128 scope global \\       valid_lft forever preferred_lft forever
";
        assert_eq!(holders(listing, "169.254.96.16".parse().unwrap()), ["lo", "edgemesh0"]);
        assert_eq!(holders(listing, "fd00:e16e::16".parse().unwrap()), ["lo"]);
        assert!(holders(listing, "10.0.0.1".parse().unwrap()).is_empty());
    }
}
