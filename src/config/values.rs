//! Parsing and range checks of single values: durations, port ranges, CIDRs, addresses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

pub(super) fn parse_or<T: std::str::FromStr>(v: Option<&str>, default: T) -> Result<T, String> {
    match v {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("{s:?} is not a valid address")),
    }
}

/// A duration setting: `default` when absent, else parsed and held to `min..=max` (a zero guard or
/// resync period would run iptables-save back to back; a zero timeout would refuse everything).
pub(super) fn dur_in(v: Option<&str>, default: Duration, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = v.map_or(Ok(default), parse_duration)?;
    if d < min || d > max {
        return Err(format!("{} is outside the accepted range {}..={}", show_dur(d), show_dur(min), show_dur(max)));
    }
    Ok(d)
}

fn show_dur(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 1000 != 0 || ms == 0 => format!("{ms}ms"),
        ms => format!("{}s", ms / 1000),
    }
}

/// A whole-number setting held to `min..=max` (no silent clamping).
pub(super) fn num_in<T: PartialOrd + fmt::Display + Copy>(
    v: Option<T>,
    default: T,
    min: T,
    max: T,
) -> Result<T, String> {
    let n = v.unwrap_or(default);
    if n < min || n > max {
        return Err(format!("{n} is outside the accepted range {min}..={max}"));
    }
    Ok(n)
}

/// Where the proxy may listen: an address of this node that no ClusterIP, client or peer uses.
pub(super) fn check_listen_ip(ip: IpAddr, service_cidrs: &[(IpAddr, u8)]) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!(
            "{ip} cannot be the proxy's address (unspecified, loopback, multicast or broadcast); \
             use a link-local or private address of the node, default 169.254.96.16 / fd00:e16e::16"
        ));
    }
    if let Some((net, len)) = service_cidrs.iter().find(|(net, len)| cidr_contains(*net, *len, ip)) {
        return Err(format!("{ip} lies inside serviceCIDRs {net}/{len}: the proxy's address cannot be a ClusterIP"));
    }
    Ok(())
}

fn cidr_contains(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

pub(super) const MILLI: Duration = Duration::from_millis(1);
pub(super) const SECOND: Duration = Duration::from_secs(1);
pub(super) const MINUTE: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);

/// `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?} (use e.g. 250ms, 5s, 2m)");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(super) fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not a port range like 15002-15999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

/// `10.96.0.0/12` -> (network address, prefix length).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not a CIDR like 10.96.0.0/12");
    let (ip, len) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}
