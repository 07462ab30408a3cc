//! The one place a process is started: `iptables*` and `nft` by the rules.
//! Standard output and error are captured; standard input is the given text or nothing.

use std::io::{self, Write as _};
use std::process::{Command, Output, Stdio};

/// Run `binary` with `args`, feeding it `stdin`, and wait for it.
pub fn run(binary: &str, args: &[&str], stdin: Option<&str>) -> io::Result<Output> {
    let mut cmd = Command::new(binary);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    let mut child = cmd.spawn()?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error (the process died early) shows up in its exit status and stderr.
        let _ = pipe.write_all(text.as_bytes());
    }
    child.wait_with_output()
}

/// The standard output of `binary args` when it succeeds; `None` when it cannot run or fails.
pub fn stdout_if_ok(binary: &str, args: &[&str]) -> Option<String> {
    run(binary, args, None).ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}
