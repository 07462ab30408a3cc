//! Shipping checks: the OpenWrt .ipk built from the real binary, the procd init script (under
//! shellcheck and against a stub of procd's and UCI's shell helpers: flags, the generated config
//! file, user and capabilities, and that UCI reaches every config file field), the capabilities
//! file, the systemd unit (`systemd-analyze verify` and `security`), its tmpfiles entry and
//! sample config. The feed Makefile against a stub SDK: tests/openwrt_feed.rs.
//!
//! Needs shellcheck, GNU tar, gzip, dash and systemd-analyze / systemd-tmpfiles (Debian's
//! systemd); tests/setup.sh installs them. A missing tool fails the test, never skips it.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::tempdir::{cargo_version, repo, TempDir};

use argh::FromArgs as _;
use edgeproxy::config::{Config, Overrides};

const BIN: &str = env!("CARGO_BIN_EXE_edgeproxy");
/// procd's capabilities file for the agent, installed as /etc/capabilities/edgeproxy.json.
const CAPS_FILE: &str = "openwrt/edgeproxy/files/edgeproxy.capabilities";

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed? see tests/setup.sh)"))
}

/// Run; panic with its output unless it succeeds; return stdout.
fn ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ----------------------------------------------------------------------------------------------
// .ipk

/// `tar -tv` lines -> (path, mode string, owner/group).
fn tar_listing(archive: &Path) -> Vec<(String, String, String)> {
    let text = ok(Command::new("tar").arg("--numeric-owner").arg("-tvzf").arg(archive));
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 6, "unexpected tar line {l:?}");
            (f[f.len() - 1].to_string(), f[0].to_string(), f[1].to_string())
        })
        .collect()
}

fn control_fields(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with(' ')) {
        let (k, v) = line.split_once(": ").unwrap_or_else(|| panic!("bad control line {line:?}"));
        assert!(m.insert(k.to_string(), v.to_string()).is_none(), "field {k} twice");
    }
    m
}

#[test]
fn ipk_from_built_binary_has_control_fields_files_and_modes() {
    let out = TempDir::new("pkg", "ipk");
    let printed =
        ok(Command::new(repo().join("openwrt/build-ipk.sh")).arg(BIN).arg(out.path()).arg("aarch64_cortex-a53"));
    let version = format!("{}-1", cargo_version());
    let ipk = out.path().join(format!("edgeproxy_{version}_aarch64_cortex-a53.ipk"));
    assert_eq!(printed.trim(), ipk.to_str().unwrap());

    // Outer archive: gzip'ed tar of exactly these three members, in opkg's order.
    let outer = tar_listing(&ipk);
    let names: Vec<&str> = outer.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(names, ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]);
    let unpacked = TempDir::new("pkg", "ipk-x");
    ok(Command::new("tar").arg("-xzf").arg(&ipk).arg("-C").arg(unpacked.path()));
    assert_eq!(fs::read_to_string(unpacked.path().join("debian-binary")).unwrap(), "2.0\n");

    // Control.
    let ctl = unpacked.path().join("control.tar.gz");
    let ctl_names: Vec<String> = tar_listing(&ctl).into_iter().map(|(p, _, _)| p).collect();
    assert_eq!(ctl_names, ["./", "./conffiles", "./control", "./postinst", "./prerm"]);
    let control = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./control"));
    let f = control_fields(&control);
    assert_eq!(f["Package"], "edgeproxy");
    assert_eq!(f["Version"], version);
    assert_eq!(f["Architecture"], "aarch64_cortex-a53");
    assert_eq!(f["Depends"], "nftables-json, kmod-nft-nat");
    assert_eq!(f["License"], "Apache-2.0");
    assert_eq!(f["Section"], "net");
    // OpenWrt's default_postinst makes this user and group (the feed Makefile's USERID).
    let mk = fs::read_to_string(repo().join("openwrt/edgeproxy/Makefile")).unwrap();
    assert_eq!(f["Require-User"], makefile_userid(&mk));
    assert!(f["Description"].contains("ClusterIP"), "{control}");
    for k in ["Maintainer", "Source", "SourceName", "Priority"] {
        assert!(f.contains_key(k), "{k} missing from\n{control}");
    }
    let conffiles = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./conffiles"));
    assert_eq!(conffiles, "/etc/config/edgeproxy\n");
    let postinst = ok(Command::new("tar").arg("-xOzf").arg(&ctl).arg("./postinst"));
    assert!(postinst.contains("default_postinst"), "{postinst}");

    // Data: files, modes, owners; the binary is the one we gave.
    let data = unpacked.path().join("data.tar.gz");
    let listing = tar_listing(&data);
    let files: BTreeMap<&str, (&str, &str)> = listing
        .iter()
        .filter(|(_, m, _)| m.starts_with('-'))
        .map(|(p, m, o)| (p.as_str(), (m.as_str(), o.as_str())))
        .collect();
    let expect = BTreeMap::from([
        ("./etc/capabilities/edgeproxy.json", ("-rw-r--r--", "0/0")),
        ("./etc/config/edgeproxy", ("-rw-------", "0/0")),
        ("./etc/init.d/edgeproxy", ("-rwxr-xr-x", "0/0")),
        ("./usr/sbin/edgeproxy", ("-rwxr-xr-x", "0/0")),
    ]);
    assert_eq!(files, expect);
    for (p, m, o) in &listing {
        assert_eq!(o, "0/0", "{p} owned by root");
        if m.starts_with('d') {
            assert_eq!(m, "drwxr-xr-x", "{p}");
        }
    }
    let bytes = output(Command::new("tar").arg("-xOzf").arg(&data).arg("./usr/sbin/edgeproxy")).stdout;
    assert!(bytes == fs::read(BIN).unwrap(), "the packaged binary differs from {BIN}");
    let init = output(Command::new("tar").arg("-xOzf").arg(&data).arg("./etc/init.d/edgeproxy")).stdout;
    assert_eq!(init, fs::read(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap());
    let caps = output(Command::new("tar").arg("-xOzf").arg(&data).arg("./etc/capabilities/edgeproxy.json")).stdout;
    assert_eq!(caps, fs::read(repo().join(CAPS_FILE)).unwrap());
    let installed: u64 = f["Installed-Size"].parse().unwrap();
    let sum = bytes.len() as u64
        + init.len() as u64
        + caps.len() as u64
        + fs::metadata(repo().join("openwrt/edgeproxy/files/edgeproxy.config")).unwrap().len();
    assert_eq!(installed, sum, "Installed-Size is the sum of the file sizes");
}

#[test]
fn ipk_is_reproducible() {
    let (a, b) = (TempDir::new("pkg", "ipk-a"), TempDir::new("pkg", "ipk-b"));
    let build = |d: &Path| {
        let p = ok(Command::new(repo().join("openwrt/build-ipk.sh"))
            .arg(BIN)
            .arg(d)
            .arg("x86_64")
            .env("SOURCE_DATE_EPOCH", "1700000000"));
        fs::read(p.trim()).unwrap()
    };
    assert!(build(a.path()) == build(b.path()), "two builds of the same input differ");
}

#[test]
fn build_ipk_refuses_bad_input_with_a_reason() {
    let out = TempDir::new("pkg", "ipk-bad");
    let script = repo().join("openwrt/build-ipk.sh");
    let cases: [(&str, Option<&str>, &str); 4] = [
        ("/nonexistent/edgeproxy", Some("x86_64"), "no such file"),
        ("Cargo.toml", Some("x86_64"), "not executable"),
        ("openwrt/build-ipk.sh", Some("x86_64"), "not an ELF binary"),
        (BIN, Some("x86 64"), "not a valid architecture name"),
    ];
    for (bin, arch, why) in cases {
        let mut cmd = Command::new(&script);
        cmd.current_dir(repo()).arg(bin).arg(out.path());
        if let Some(a) = arch {
            cmd.arg(a);
        }
        let o = output(&mut cmd);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(why),
            "{bin} {arch:?}: want failure with {why:?}, got {}: {err}",
            o.status
        );
    }
    let o = output(Command::new(&script).arg(BIN));
    assert_eq!(o.status.code(), Some(2), "usage error without OUTDIR");
    assert!(fs::read_dir(out.path()).unwrap().next().is_none(), "no package left behind");
}

// ----------------------------------------------------------------------------------------------
// Shell scripts

#[test]
#[ignore = "needs shellcheck (tests/setup.sh installs it)"]
fn shell_scripts_are_shellcheck_clean() {
    let scripts = [
        "openwrt/edgeproxy/files/edgeproxy.init",
        "openwrt/build-ipk.sh",
        "cross/build.sh",
        "cross/toolchain.sh",
        "cross/test-aarch64.sh",
        "cross/test-32bit.sh",
        "cross/smoke.sh",
        "tests/setup.sh",
        "tests/run-all.sh",
        "tests/demo.sh",
        "tests/fresh-machine.sh",
        "fuzz/run.sh",
        "tests/systemd/boot.sh",
        ".ci/run",
    ];
    for s in scripts {
        let path = repo().join(s);
        assert!(path.exists(), "{s} missing");
        // -x from the top of the checkout: follow the files a script sources (cross/toolchain.sh).
        ok(Command::new("shellcheck").current_dir(repo()).arg("-x").arg("--severity=style").arg(s));
    }
}

#[test]
#[ignore = "needs shellcheck (tests/setup.sh installs it)"]
fn shellcheck_catches_a_planted_problem() {
    // The check above only means something if shellcheck flags the init script's dialect.
    let dir = TempDir::new("pkg", "sc");
    let text = fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap();
    let bad = dir.path().join("bad.init");
    fs::write(
        &bad,
        text.replace("procd_append_param command \"--$2\" \"$value\"", "procd_append_param command --$2 $value"),
    )
    .unwrap();
    let o = output(Command::new("shellcheck").arg(&bad));
    assert!(!o.status.success(), "shellcheck accepted unquoted expansions");
}

// ----------------------------------------------------------------------------------------------
// procd init script against stubs

/// Stubs of OpenWrt's /lib/functions.sh (config_*, user_exists), /lib/functions/procd.sh
/// (procd_*) and of the commands the init script runs that the test machine must not run for
/// real (chown, chgrp to a user it does not have; logger). Calls are recorded one per line,
/// arguments separated by \x1f, into $PROCD_LOG. mkdir, chmod, mv and rm run for real: the
/// script's paths point into a fake root (see [`run_init_on`]).
const STUB: &str = r#"
config_load() { _rec config_load "$@"; . "$UCI_STATE/$1.sh"; }
config_get() {
	case $# in
	4) eval "$1=\"\${CONFIG_${2}_${3}:-\$4}\"" ;;
	3) eval "$1=\"\${CONFIG_${2}_${3}:-}\"" ;;
	*) echo "stub config_get: bad arguments: $*" >&2; exit 99 ;;
	esac
}
config_get_bool() {
	local _b
	config_get _b "$2" "$3" "$4"
	case "$_b" in
	1|on|true|yes|enabled) _b=1 ;;
	0|off|false|no|disabled) _b=0 ;;
	*) _b="$4" ;;
	esac
	eval "$1=\$_b"
}
config_list_foreach() {
	local _s="$1" _o="$2" _f="$3" _n _i=1 _v
	shift 3
	eval "_n=\${CONFIG_${_s}_${_o}_LENGTH:-0}"
	while [ "$_i" -le "$_n" ]; do
		eval "_v=\${CONFIG_${_s}_${_o}_ITEM${_i}}"
		"$_f" "$_v" "$@"
		_i=$((_i + 1))
	done
}
user_exists() { case " $STUB_USERS " in *" $1 "*) return 0 ;; esac; return 1; }
_rec() {
	printf '%s' "$1" >>"$PROCD_LOG"
	shift
	for _a in "$@"; do printf '\037%s' "$_a" >>"$PROCD_LOG"; done
	printf '\n' >>"$PROCD_LOG"
}
procd_open_instance() { _rec procd_open_instance "$@"; }
procd_set_param() { _rec procd_set_param "$@"; }
procd_append_param() { _rec procd_append_param "$@"; }
procd_close_instance() { _rec procd_close_instance "$@"; }
procd_add_jail() { _rec procd_add_jail "$@"; }
procd_add_reload_trigger() { _rec procd_add_reload_trigger "$@"; }
chown() { _rec chown "$@"; }
chgrp() { _rec chgrp "$@"; }
logger() { _rec logger "$@"; }
"#;

/// The init script's variables that name a file or directory: each points into the fake root
/// in tests. A new path variable must be added here (the test below checks the script has no
/// other), or a test would touch the machine's own.
const INIT_PATHS: [&str; 7] =
    ["RUN_DIR", "DEFAULT_STATE_DIR", "DEFAULT_CONFIG", "GENERATED_CONFIG", "CAPABILITIES", "UJAIL", "XTABLES_LOCK"];

/// UCI text -> shell assignments as OpenWrt's config_load leaves them (options of named
/// sections; lists as _LENGTH/_ITEMn, and their items joined with spaces as the option).
fn uci_to_shell(uci: &str) -> String {
    let mut out = String::new();
    let mut section = String::new();
    let mut lists: BTreeMap<String, usize> = BTreeMap::new();
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    for line in uci.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (kw, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let (name, value) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), ""));
        let value = value.trim().trim_matches('\'');
        let name = name.trim_matches('\'');
        match kw {
            "config" => section = value.to_string(),
            "option" => out += &format!("CONFIG_{section}_{name}={}\n", q(value)),
            "list" => {
                let n = lists.entry(format!("{section}_{name}")).or_default();
                *n += 1;
                out += &format!("CONFIG_{section}_{name}_ITEM{n}={}\nCONFIG_{section}_{name}_LENGTH={n}\n", q(value));
                let v = format!("CONFIG_{section}_{name}");
                out += &format!("{v}=\"${{{v}:+${v} }}\"{}\n", q(value));
            }
            other => panic!("uci keyword {other:?} in {line:?}"),
        }
    }
    out
}

type Instance = BTreeMap<String, Vec<String>>;

#[derive(Debug, Default, PartialEq)]
struct Procd {
    /// Each instance: param -> values (set replaces, append extends), as procd keeps them;
    /// procd_add_jail's arguments as "jail".
    instances: Vec<Instance>,
    reload_triggers: Vec<String>,
    config_loads: Vec<String>,
    /// chown, chgrp and logger, with their arguments.
    commands: Vec<Vec<String>>,
}

impl Procd {
    fn commands(&self, name: &str) -> Vec<Vec<String>> {
        self.commands.iter().filter(|c| c[0] == name).map(|c| c[1..].to_vec()).collect()
    }
}

/// What the fake router has besides the init script and the package's files.
#[derive(Default)]
struct Router {
    /// /sbin/ujail (package procd-ujail).
    ujail: bool,
    /// The user edgeproxy (made by the package's postinst).
    user: bool,
    /// More files: path, content.
    files: Vec<(&'static str, String)>,
}

impl Router {
    /// ujail and the user there: the agent can run as its user.
    fn least_privilege() -> Router {
        Router { ujail: true, user: true, files: Vec::new() }
    }
}

/// [`run_init_on`] a router without ujail.
fn run_init(uci: &str, calls: &str, extra: &str) -> (Procd, Output) {
    run_init_on(&Router::default(), uci, calls, extra)
}

/// Source the stubs and the init script in dash (the closest to busybox ash here), point its
/// paths into a fake root ($ROOT, the package's capabilities file installed), run `calls`, and
/// replay the record with $ROOT taken off the paths again.
fn run_init_on(router: &Router, uci: &str, calls: &str, extra: &str) -> (Procd, Output) {
    let dir = TempDir::new("pkg", "procd");
    let state = dir.path().join("uci");
    fs::create_dir_all(&state).unwrap();
    fs::write(state.join("edgeproxy.sh"), uci_to_shell(uci)).unwrap();
    fs::write(dir.path().join("stub.sh"), STUB).unwrap();
    let log = dir.path().join("procd.log");
    fs::write(&log, "").unwrap();
    let root = dir.path().join("root");
    let mut files = router.files.clone();
    files.push(("/etc/capabilities/edgeproxy.json", fs::read_to_string(repo().join(CAPS_FILE)).unwrap()));
    if router.ujail {
        files.push(("/sbin/ujail", "#!/bin/sh\nexit 0\n".into()));
    }
    for (path, text) in files {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let init = repo().join("openwrt/edgeproxy/files/edgeproxy.init");
    let fake_root: String = INIT_PATHS.iter().map(|v| format!("{v}=\"$ROOT${v}\"\n")).collect();
    let script = format!(". \"$STUB\"\n. \"$INIT\"\n{fake_root}{extra}\n{calls}\n");
    let mut out = output(
        Command::new("dash")
            .arg("-c")
            .arg(script)
            .env("STUB", dir.path().join("stub.sh"))
            .env("INIT", &init)
            .env("UCI_STATE", &state)
            .env("PROCD_LOG", &log)
            .env("STUB_DIR", dir.path())
            .env("ROOT", &root)
            .env("STUB_USERS", if router.user { "root edgeproxy" } else { "root" }),
    );
    assert!(out.status.success(), "init script failed: {}", String::from_utf8_lossy(&out.stderr));
    let root = root.to_str().unwrap().to_string();
    out.stdout = String::from_utf8_lossy(&out.stdout).replace(&root, "").into_bytes();
    let mut p = Procd::default();
    let mut open: Option<Instance> = None;
    for line in fs::read_to_string(&log).unwrap().lines() {
        let mut parts = line.split('\x1f');
        let call = parts.next().unwrap();
        let args: Vec<String> = parts.map(|a| a.replace(&root, "")).collect();
        match call {
            "config_load" => p.config_loads.push(args.join(" ")),
            "procd_open_instance" => {
                assert!(open.is_none(), "instance opened twice");
                open = Some(BTreeMap::new());
            }
            "procd_set_param" | "procd_append_param" => {
                let inst = open.as_mut().unwrap_or_else(|| panic!("{call} outside an instance"));
                let (k, v) = args.split_first().expect("param name");
                let e = inst.entry(k.clone()).or_default();
                if call == "procd_set_param" {
                    e.clear();
                }
                e.extend(v.iter().cloned());
            }
            "procd_add_jail" => {
                let inst = open.as_mut().unwrap_or_else(|| panic!("{call} outside an instance"));
                assert!(inst.insert("jail".into(), args).is_none(), "jail added twice");
            }
            "procd_close_instance" => p.instances.push(open.take().expect("close without open")),
            "procd_add_reload_trigger" => p.reload_triggers.extend(args),
            "chown" | "chgrp" | "logger" => p.commands.push([vec![call.to_string()], args].concat()),
            other => panic!("unexpected call {other}"),
        }
    }
    assert!(open.is_none(), "instance never closed");
    (p, out)
}

fn shipped_uci() -> String {
    fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.config")).unwrap()
}

fn enabled_uci() -> String {
    let uci = shipped_uci();
    assert!(uci.contains("option enabled '0'"));
    uci.replace("option enabled '0'", "option enabled '1'")
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

#[test]
fn procd_init_paths_all_point_into_the_fake_root_in_tests() {
    let text = fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap();
    let mut vars: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("=/"))
        .map(|(v, _)| v)
        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    vars.sort_unstable();
    let mut want: Vec<&str> = INIT_PATHS.to_vec();
    // PROG only runs in service_stopped, whose test replaces it.
    want.push("PROG");
    want.sort_unstable();
    assert_eq!(vars, want, "every path variable of the init script must be in INIT_PATHS");
}

#[test]
fn procd_shipped_config_is_disabled_and_starts_nothing() {
    let (p, _) = run_init(&shipped_uci(), "start_service\nservice_triggers", "");
    assert_eq!(p.instances, Vec::<Instance>::new());
    assert_eq!(p.reload_triggers, ["edgeproxy"]);
    assert!(p.commands.is_empty(), "{:?}", p.commands);
}

/// The command line of the shipped config, enabled.
fn shipped_command() -> Vec<String> {
    let host = hostname();
    [
        "/usr/sbin/edgeproxy",
        "--log-level",
        "info",
        "--log-target",
        "syslog",
        "run",
        "--run-dir",
        "/var/run/edgeproxy",
        "--metaserver",
        "http://127.0.0.1:10550",
        "--watch",
        "true",
        "--layout",
        "nftables",
        "--node-name",
        host.as_str(),
        "--iptables-backend",
        "auto",
        "--metrics-address",
        "",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn procd_shipped_config_enabled_gives_defaults_with_metrics_off_as_its_own_user() {
    let (p, _) = run_init_on(&Router::least_privilege(), &enabled_uci(), "start_service", "");
    assert_eq!(p.instances.len(), 1);
    let i = &p.instances[0];
    let want = shipped_command();
    assert_eq!(i["command"], want);
    assert_eq!(i["respawn"], ["3600", "5", "0"]);
    assert_eq!(i["term_timeout"], ["15"]);
    assert_eq!(i["limits"], ["nofile=65536 65536"]);
    assert_eq!(i["stdout"], ["1"]);
    assert_eq!(i["stderr"], ["1"]);
    // Least privilege: procd hands user, group, capabilities and no_new_privs to ujail, which
    // a jail entry (without namespace options: no new root) makes it start.
    assert_eq!(i["user"], ["edgeproxy"]);
    assert_eq!(i["group"], ["edgeproxy"]);
    assert_eq!(i["capabilities"], ["/etc/capabilities/edgeproxy.json"]);
    assert_eq!(i["no_new_privs"], ["1"]);
    assert_eq!(i["jail"], ["edgeproxy"]);
    // ujail gives the agent only the environment procd names: PATH for iptables-restore.
    assert_eq!(i["env"], ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]);
    assert!(!i.contains_key("file"), "no generated config for the shipped options");
    assert_eq!(p.config_loads, ["edgeproxy"]);
    // What the agent writes is its user's: the run directory, the default state directory,
    // iptables-legacy's lock.
    assert_eq!(
        p.commands("chown"),
        [vec!["-R", "edgeproxy:edgeproxy", "/var/run/edgeproxy"], vec!["edgeproxy:edgeproxy", "/var/lib/edgeproxy"]]
    );
    assert_eq!(p.commands("chgrp"), [vec!["edgeproxy", "/var/run/xtables.lock"]]);
    assert!(p.commands("logger").is_empty(), "{:?}", p.commands);

    // And the binary accepts exactly these flags (argh): `--help` after them parses them all.
    let mut args: Vec<&str> = want[1..].iter().map(String::as_str).collect();
    args.push("--help");
    let o = output(Command::new(BIN).args(&args));
    let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!all.contains("Unrecognized"), "the binary rejects the init script's flags: {all}");
}

#[test]
fn procd_own_paths_are_made_with_the_right_modes() {
    // The directories are made and the lock file is created group-writable (chown and chgrp
    // are recorded only: the test machine has no user edgeproxy).
    let calls = "start_service\nstat -c '%a %F' \"$RUN_DIR\" \"$DEFAULT_STATE_DIR\" \"$XTABLES_LOCK\"";
    let (_, out) = run_init_on(&Router::least_privilege(), &enabled_uci(), calls, "");
    let stat = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stat.lines().collect();
    assert_eq!(lines.len(), 3, "{stat}");
    assert!(lines[0].ends_with(" directory") && lines[1].ends_with(" directory"), "{stat}");
    assert_eq!(lines[2], "660 regular empty file", "{stat}");
}

#[test]
fn procd_without_ujail_or_user_runs_as_root_and_says_why() {
    let routers = [
        Router::default(),
        Router { ujail: false, ..Router::least_privilege() },
        Router { user: false, ..Router::least_privilege() },
    ];
    for router in &routers {
        let (p, _) = run_init_on(router, &enabled_uci(), "start_service", "");
        let i = &p.instances[0];
        assert_eq!(i["command"], shipped_command());
        // procd would start the agent as the user without a single capability: no user at all.
        for k in ["user", "group", "capabilities", "no_new_privs", "jail", "env"] {
            assert!(!i.contains_key(k), "{k} set without ujail/user (ujail {}, user {})", router.ujail, router.user);
        }
        assert!(p.commands("chown").is_empty() && p.commands("chgrp").is_empty(), "{:?}", p.commands);
        let logged = p.commands("logger");
        assert_eq!(logged.len(), 1, "{logged:?}");
        assert_eq!(logged[0][..4], ["-t", "edgeproxy", "-p", "daemon.notice"]);
        let msg = logged[0][4..].join(" ");
        assert!(msg.contains("runs as root") && msg.contains("procd-ujail"), "{msg}");
    }
}

#[test]
fn capabilities_file_is_procd_json_with_net_admin_and_net_raw_in_every_set() {
    let text = fs::read_to_string(repo().join(CAPS_FILE)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{CAPS_FILE}: {e}"));
    let obj = v.as_object().expect("a JSON object");
    let sets: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut want_sets = vec!["ambient", "bounding", "effective", "inheritable", "permitted"];
    want_sets.sort_unstable();
    assert_eq!(sets, want_sets, "procd's (OCI's) five capability sets, no other key");
    for (set, caps) in obj {
        let caps: Vec<&str> = caps
            .as_array()
            .unwrap_or_else(|| panic!("{set}: not an array"))
            .iter()
            .map(|c| c.as_str().unwrap_or_else(|| panic!("{set}: {c} is not a string")))
            .collect();
        // Ambient (and so inheritable and permitted) too: iptables-restore, a child, needs them.
        assert_eq!(caps, ["CAP_NET_ADMIN", "CAP_NET_RAW"], "{set}");
    }
    // Installed where the init script points procd, by the feed Makefile and build-ipk.sh.
    let init = fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap();
    assert!(init.contains("\nCAPABILITIES=/etc/capabilities/edgeproxy.json\n"));
    let mk = fs::read_to_string(repo().join("openwrt/edgeproxy/Makefile")).unwrap();
    assert!(mk.contains("./files/edgeproxy.capabilities $(1)/etc/capabilities/edgeproxy.json"), "{mk}");
    let ipk = fs::read_to_string(repo().join("openwrt/build-ipk.sh")).unwrap();
    assert!(ipk.contains("\"$files/edgeproxy.capabilities\" \"$data/etc/capabilities/edgeproxy.json\""));
}

#[test]
fn procd_user_is_the_packages_userid() {
    let mk = fs::read_to_string(repo().join("openwrt/edgeproxy/Makefile")).unwrap();
    let userid = makefile_userid(&mk);
    let (user, group) = userid.split_once(':').expect("USERID user=uid:group=gid");
    let (uname, uid) = user.split_once('=').expect("user=uid");
    let (gname, gid) = group.split_once('=').expect("group=gid");
    assert_eq!((uname, gname), ("edgeproxy", "edgeproxy"));
    let uid: u32 = uid.parse().unwrap();
    assert_eq!(gid.parse::<u32>().unwrap(), uid);
    assert!((100..1000).contains(&uid), "a system id: {uid}");
    let init = fs::read_to_string(repo().join("openwrt/edgeproxy/files/edgeproxy.init")).unwrap();
    assert!(init.contains("\nUSER_NAME=edgeproxy\n"));
}

fn makefile_userid(mk: &str) -> String {
    mk.lines()
        .find_map(|l| l.trim().strip_prefix("USERID:="))
        .expect("USERID in the Makefile's Package/edgeproxy")
        .to_string()
}

/// Every UCI option the init script knows, set, without config_file (the options that have
/// no flag then go to the generated config file). Every value differs from its default (the
/// test below checks it).
const ALL_OPTIONS: &str = "
config edgeproxy 'main'
	option enabled 'yes'
	option log_level 'debug'
	option source 'metaserver'
	option kubeconfig '/etc/edgeproxy/kubeconfig'
	option server 'https://192.0.2.1:6443'
	option token_file '/etc/edgeproxy/token'
	option ca_file '/etc/edgeproxy/ca.crt'
	option client_cert '/etc/edgeproxy/client.crt'
	option client_key '/etc/edgeproxy/client.key'
	option metaserver 'http://192.0.2.2:10550'
	option watch 'off'
	option poll_interval '45s'
	option endpoints_api 'endpoints'
	option layout 'portals'
	option edgemesh 'v1.9'
	option service_filter_mode 'FilterIfLabelDoesNotExists'
	option node_name 'edge node 1'
	option listen_ip '169.254.96.17'
	option tcp_port '15101'
	option load_balancer 'random'
	option data_path 'kernel'
	option workers '2'
	option pin_workers '1'
	option iptables_backend 'nft'
	option min_sync_period '500ms'
	option guard_period '5s'
	option resync_period '2m'
	option state_dir '/etc/edgeproxy/state'
	option offline_after '20s'
	option metrics_address '127.0.0.1:10551'
	option no_proxy_label '0'
	option default_ignores 'off'
	list service_cidr '10.43.0.0/16'
	list service_cidr 'fd00:43::/112'
	option listen_ipv6 'fd00:e16e::17'
	option listen_device 'edge0'
	option udp_ports '20000-20999'
	option mark '0x200000'
	option reject_port '15100'
	option dial_timeout '3s'
	option dial_attempts '5'
	option tcp_buffer_size '32768'
	option tcp_max_connections_per_source '512'
	option tcp_idle_timeout '1h'
	option probe_interval '10s'
	option probes_per_second '50'
	option udp_idle_timeout '45s'
	option udp_max_flows '2048'
	option udp_max_flows_per_source '256'
";

/// The command line [`ALL_OPTIONS`] must give.
fn all_options_command() -> Vec<&'static str> {
    vec![
        "/usr/sbin/edgeproxy",
        "--log-level",
        "debug",
        "--log-target",
        "syslog",
        "run",
        "--run-dir",
        "/var/run/edgeproxy",
        "--config",
        "/var/etc/edgeproxy.json",
        "--source",
        "metaserver",
        "--kubeconfig",
        "/etc/edgeproxy/kubeconfig",
        "--server",
        "https://192.0.2.1:6443",
        "--token-file",
        "/etc/edgeproxy/token",
        "--ca-file",
        "/etc/edgeproxy/ca.crt",
        "--client-cert",
        "/etc/edgeproxy/client.crt",
        "--client-key",
        "/etc/edgeproxy/client.key",
        "--metaserver",
        "http://192.0.2.2:10550",
        "--watch",
        "false",
        "--poll-interval",
        "45s",
        "--endpoints-api",
        "endpoints",
        "--layout",
        "portals",
        "--edgemesh",
        "v1.9",
        "--service-filter-mode",
        "FilterIfLabelDoesNotExists",
        "--node-name",
        "edge node 1",
        "--listen-ip",
        "169.254.96.17",
        "--tcp-port",
        "15101",
        "--load-balancer",
        "random",
        "--data-path",
        "kernel",
        "--workers",
        "2",
        "--iptables-backend",
        "nft",
        "--min-sync-period",
        "500ms",
        "--guard-period",
        "5s",
        "--resync-period",
        "2m",
        "--state-dir",
        "/etc/edgeproxy/state",
        "--offline-after",
        "20s",
        "--metrics-address",
        "127.0.0.1:10551",
    ]
}

#[test]
fn procd_maps_every_uci_option_onto_its_flag() {
    let uci = ALL_OPTIONS;
    let (p, _) = run_init_on(&Router::least_privilege(), uci, "start_service", "");
    let i = &p.instances[0];
    let cmd = &i["command"];
    let want = all_options_command();
    assert_eq!(*cmd, want);
    // A change of the generated file restarts the agent on reload (it reads it at start).
    assert_eq!(i["file"], ["/var/etc/edgeproxy.json"]);
    // The state directory is the configured one, and its owner the agent's user.
    assert!(p.commands("chown").contains(&vec!["edgeproxy:edgeproxy".into(), "/etc/edgeproxy/state".into()]));
    // Every `run` flag of the binary is reachable from UCI.
    let help = output(Command::new(BIN).args(["run", "--help"]));
    let help = String::from_utf8_lossy(&help.stdout);
    let options = help.split_once("Options:").map_or("", |(_, o)| o);
    let flags: Vec<&str> = options
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|w| w.trim_end_matches(','))
        .filter(|w| w.starts_with("--") && *w != "--help")
        .collect();
    assert!(flags.len() >= 18, "cannot read the flags from `run --help`:\n{help}");
    for flag in flags {
        assert!(want.contains(&flag), "`run {flag}` has no UCI option in the init script");
    }
}

/// Every field of the config file (its JSON path) with the UCI option that sets it: through a
/// flag, or (fields without a flag) through the config file the init script generates.
const UCI_OPTION_OF_FIELD: &[(&str, &str)] = &[
    ("edgemesh", "edgemesh"),
    ("serviceFilterMode", "service_filter_mode"),
    ("noProxyLabel", "no_proxy_label"),
    ("defaultIgnores", "default_ignores"),
    ("layout", "layout"),
    ("serviceCIDRs", "service_cidr"),
    ("nodeName", "node_name"),
    ("listen.ip", "listen_ip"),
    ("listen.ipv6", "listen_ipv6"),
    ("listen.device", "listen_device"),
    ("listen.tcpPort", "tcp_port"),
    ("listen.udpPorts", "udp_ports"),
    ("listen.mark", "mark"),
    ("listen.rejectPort", "reject_port"),
    ("source.kind", "source"),
    ("source.kubeconfig", "kubeconfig"),
    ("source.server", "server"),
    ("source.tokenFile", "token_file"),
    ("source.caFile", "ca_file"),
    ("source.clientCert", "client_cert"),
    ("source.clientKey", "client_key"),
    ("source.metaServer", "metaserver"),
    ("source.watch", "watch"),
    ("source.pollInterval", "poll_interval"),
    ("source.endpointsApi", "endpoints_api"),
    ("loadBalancer", "load_balancer"),
    ("dataPath", "data_path"),
    ("workers", "workers"),
    ("pinWorkers", "pin_workers"),
    ("tcp.dialTimeout", "dial_timeout"),
    ("tcp.dialAttempts", "dial_attempts"),
    ("tcp.bufferSize", "tcp_buffer_size"),
    ("tcp.maxConnectionsPerSource", "tcp_max_connections_per_source"),
    ("tcp.idleTimeout", "tcp_idle_timeout"),
    ("tcp.probeInterval", "probe_interval"),
    ("tcp.probesPerSecond", "probes_per_second"),
    ("udp.idleTimeout", "udp_idle_timeout"),
    ("udp.maxFlows", "udp_max_flows"),
    ("udp.maxFlowsPerSource", "udp_max_flows_per_source"),
    ("iptables.backend", "iptables_backend"),
    ("iptables.minSyncPeriod", "min_sync_period"),
    ("iptables.guardPeriod", "guard_period"),
    ("iptables.resyncPeriod", "resync_period"),
    ("metricsAddress", "metrics_address"),
    ("stateDir", "state_dir"),
    ("offlineAfter", "offline_after"),
];

/// Config-file fields without a UCI option, on purpose (openwrt/README.md names them too).
const FIELDS_WITHOUT_UCI_OPTION: &[(&str, &str)] = &[
    // The init script owns the run directory: --run-dir /var/run/edgeproxy, made and given to
    // the agent's user at start, written by mark_restart and read by `cleanup` in
    // service_stopped. A UCI option would have to move all of these together, for nothing.
    ("runDir", "fixed by the init script: /var/run/edgeproxy"),
];

/// The config [`ALL_OPTIONS`] must give the agent: every field of the file, each set to the
/// value of its UCI option (runDir: the init script's).
const ALL_OPTIONS_CONFIG: &str = r#"{
  "edgemesh": "v1.9",
  "serviceFilterMode": "FilterIfLabelDoesNotExists",
  "noProxyLabel": false,
  "defaultIgnores": "off",
  "layout": "portals",
  "serviceCIDRs": ["10.43.0.0/16", "fd00:43::/112"],
  "nodeName": "edge node 1",
  "listen": {
    "ip": "169.254.96.17",
    "ipv6": "fd00:e16e::17",
    "device": "edge0",
    "tcpPort": 15101,
    "udpPorts": "20000-20999",
    "mark": 2097152,
    "rejectPort": 15100
  },
  "source": {
    "kind": "metaserver",
    "kubeconfig": "/etc/edgeproxy/kubeconfig",
    "server": "https://192.0.2.1:6443",
    "tokenFile": "/etc/edgeproxy/token",
    "caFile": "/etc/edgeproxy/ca.crt",
    "clientCert": "/etc/edgeproxy/client.crt",
    "clientKey": "/etc/edgeproxy/client.key",
    "metaServer": "http://192.0.2.2:10550",
    "watch": false,
    "pollInterval": "45s",
    "endpointsApi": "endpoints"
  },
  "loadBalancer": "random",
  "dataPath": "kernel",
  "workers": 2,
  "pinWorkers": true,
  "tcp": {
    "dialTimeout": "3s",
    "dialAttempts": 5,
    "bufferSize": 32768,
    "maxConnectionsPerSource": 512,
    "idleTimeout": "1h",
    "probeInterval": "10s",
    "probesPerSecond": 50
  },
  "udp": {"idleTimeout": "45s", "maxFlows": 2048, "maxFlowsPerSource": 256},
  "iptables": {"backend": "nft", "minSyncPeriod": "500ms", "guardPeriod": "5s", "resyncPeriod": "2m"},
  "metricsAddress": "127.0.0.1:10551",
  "stateDir": "/etc/edgeproxy/state",
  "runDir": "/var/run/edgeproxy",
  "offlineAfter": "20s"
}"#;

/// The config file's fields as dotted paths, from the agent's own parser: the error for an
/// unknown key lists the keys an object takes (`deny_unknown_fields`); a key whose value cannot
/// be an object is a field.
fn config_file_fields() -> Vec<String> {
    fn keys_of(path: &[String]) -> Option<Vec<String>> {
        let mut text = String::from(r#"{"probe-not-a-field": 0}"#);
        for k in path.iter().rev() {
            text = format!(r#"{{"{k}": {text}}}"#);
        }
        let e = Config::from_text(&text, "probe", &Overrides::default()).expect_err("an unknown key is an error");
        if !e.message.contains("unknown field `probe-not-a-field`") {
            return None;
        }
        let list = e.message.split_once("expected").map(|(_, l)| l).unwrap_or("");
        Some(list.split('`').skip(1).step_by(2).map(str::to_string).collect())
    }
    fn walk(path: &mut Vec<String>, out: &mut Vec<String>) {
        match keys_of(path) {
            Some(keys) => {
                assert!(!keys.is_empty(), "cannot read the keys of {path:?}");
                for k in keys {
                    path.push(k);
                    walk(path, out);
                    path.pop();
                }
            }
            None => out.push(path.join(".")),
        }
    }
    let mut out = Vec::new();
    walk(&mut Vec::new(), &mut out);
    out
}

/// The dotted paths of the leaves (non-objects) of a JSON object.
fn json_leaves(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in v.as_object().expect("an object") {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            serde_json::Value::Object(_) => json_leaves(v, &path, out),
            _ => out.push(path),
        }
    }
}

/// The agent's config from the init script's command line and the file it names (text given).
fn config_of_command(command: &[String], file_text: &str) -> Result<Config, String> {
    let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
    let cli = edgeproxy::cli::Cli::from_args(&["edgeproxy"], &args).map_err(|e| e.output)?;
    let Some(edgeproxy::cli::Command::Run(run)) = cli.command else { panic!("not `run`: {command:?}") };
    Config::from_text(file_text, "generated", &run.overrides()).map_err(|e| e.to_string())
}

#[test]
fn config_file_fields_are_read_from_the_parser() {
    // The reader the next test relies on: it finds nested fields and renamed ones.
    let fields = config_file_fields();
    for f in ["edgemesh", "serviceCIDRs", "listen.udpPorts", "listen.tcpPort", "tcp.dialTimeout", "udp.maxFlows"] {
        assert!(fields.iter().any(|x| x == f), "{f} not found in {fields:?}");
    }
    assert!(!fields.iter().any(|x| x == "listen" || x == "tcp"), "sections are not fields: {fields:?}");
    assert!(fields.len() >= 40, "{fields:?}");
}

#[test]
fn procd_uci_options_reach_every_config_file_field() {
    let fields = config_file_fields();
    let mapped: Vec<&str> = UCI_OPTION_OF_FIELD.iter().map(|(f, _)| *f).collect();
    let excluded: Vec<&str> = FIELDS_WITHOUT_UCI_OPTION.iter().map(|(f, _)| *f).collect();
    for f in &fields {
        assert!(
            mapped.contains(&f.as_str()) || excluded.contains(&f.as_str()),
            "config file field {f} has no UCI option: map it in edgeproxy.init (a flag, or \
             collect_file_options) and add it to UCI_OPTION_OF_FIELD, ALL_OPTIONS and \
             ALL_OPTIONS_CONFIG, or say why not in FIELDS_WITHOUT_UCI_OPTION"
        );
    }
    for f in mapped.iter().chain(&excluded) {
        assert!(fields.iter().any(|x| x == f), "{f} is not a config file field (any more)");
        assert_eq!(mapped.iter().chain(&excluded).filter(|x| *x == f).count(), 1, "{f} listed twice");
    }
    for (field, option) in UCI_OPTION_OF_FIELD {
        let set = ALL_OPTIONS.lines().map(str::trim).any(|l| {
            l.strip_prefix("option ")
                .or_else(|| l.strip_prefix("list "))
                .is_some_and(|r| r.starts_with(&format!("{option} ")))
        });
        assert!(set, "ALL_OPTIONS does not set {option} ({field})");
    }
    // The config the agent gets from ALL_OPTIONS (command line and generated file) is the one
    // that sets every field to its option's value: so every option reaches its own field.
    let expected_json: serde_json::Value = serde_json::from_str(ALL_OPTIONS_CONFIG).unwrap();
    let mut leaves = Vec::new();
    json_leaves(&expected_json, "", &mut leaves);
    leaves.sort();
    let mut all = fields.clone();
    all.sort();
    assert_eq!(leaves, all, "ALL_OPTIONS_CONFIG must set every field of the config file");
    let expected = Config::from_text(ALL_OPTIONS_CONFIG, "ALL_OPTIONS_CONFIG", &Overrides::default())
        .unwrap_or_else(|e| panic!("{e}"));
    // Each of its values matters (differs from what the field is without it), so the
    // comparison below notices an option that reaches no field.
    for leaf in &leaves {
        let mut v = expected_json.clone();
        let mut obj = v.as_object_mut().unwrap();
        let mut parts: Vec<&str> = leaf.split('.').collect();
        let last = parts.pop().unwrap();
        for p in parts {
            obj = obj.get_mut(p).and_then(|x| x.as_object_mut()).unwrap();
        }
        obj.remove(last);
        let without = Config::from_text(&v.to_string(), "without", &Overrides::default());
        assert!(without.as_ref().ok() != Some(&expected), "ALL_OPTIONS_CONFIG's {leaf} is its default");
    }
    let (p, out) = run_init_on(&Router::least_privilege(), ALL_OPTIONS, "start_service\ncat \"$GENERATED_CONFIG\"", "");
    let generated = String::from_utf8_lossy(&out.stdout).into_owned();
    let command = &p.instances[0]["command"];
    let got = config_of_command(command, &generated).unwrap_or_else(|e| panic!("{e}\n{generated}"));
    assert_eq!(got, expected, "the agent's config from ALL_OPTIONS; generated file:\n{generated}");
    assert!(p.commands("logger").is_empty(), "{:?}", p.commands);
}

#[test]
fn procd_generated_config_writes_numbers_booleans_and_empty_strings_as_the_agent_reads_them() {
    let uci = "config edgeproxy 'main'
	option enabled '1'
	option mark '0x10'
	option reject_port '0015000'
	option dial_attempts 'three'
	option no_proxy_label 'yes'
	option listen_device ''
	option default_ignores 'say \"no\" \\ now'
	option udp_idle_timeout ''
	option service_cidr '10.0.0.0/8  10.1.0.0/16'
";
    let (p, out) = run_init(uci, "start_service\ncat \"$GENERATED_CONFIG\"", "");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"));
    let want = serde_json::json!({
        "noProxyLabel": true,
        // A list written as an option: its words.
        "serviceCIDRs": ["10.0.0.0/8", "10.1.0.0/16"],
        "defaultIgnores": "say \"no\" \\ now",
        // '' means "manage the addresses yourself" for the device; for the others it is unset.
        "listen": {"device": "", "mark": 16, "rejectPort": 15000},
        // Not a number: written as a string, so the agent's error names the field.
        "tcp": {"dialAttempts": "three"},
    });
    assert_eq!(v, want, "{text}");
    assert_eq!(p.instances[0]["command"][8..10], ["--config", "/var/etc/edgeproxy.json"]);
    let e = config_of_command(&p.instances[0]["command"], &text).unwrap_err();
    assert!(e.contains("tcp.dialAttempts"), "{e}");
    // The options gone: no file, no --config.
    let uci = "config edgeproxy 'main'\n\toption enabled '1'\n";
    let (p, out) = run_init(
        uci,
        "start_service\nls \"${GENERATED_CONFIG%/*}\"",
        "mkdir -p \"${GENERATED_CONFIG%/*}\"\necho '{}' >\"$GENERATED_CONFIG\"",
    );
    assert!(!p.instances[0]["command"].iter().any(|a| a == "--config"));
    assert!(!p.instances[0].contains_key("file"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "the stale generated file is removed");
}

#[test]
fn procd_config_file_wins_over_the_file_options_with_a_warning() {
    let uci = "config edgeproxy 'main'
	option enabled '1'
	option config_file '/etc/edgeproxy/mine.json'
	option udp_ports '20000-20999'
	list service_cidr '10.43.0.0/16'
";
    let (p, out) = run_init(uci, "start_service\nls \"${GENERATED_CONFIG%/*}\" 2>/dev/null || true", "");
    let cmd = &p.instances[0]["command"];
    assert_eq!(cmd[8..10], ["--config", "/etc/edgeproxy/mine.json"]);
    assert!(!p.instances[0].contains_key("file"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "", "no generated file");
    let logged = p.commands("logger");
    assert_eq!(logged.len(), 2, "{logged:?}"); // and the notice of running as root
    assert_eq!(logged[0][..4], ["-t", "edgeproxy", "-p", "daemon.warn"]);
    let msg = logged[0][4..].join(" ");
    assert!(msg.contains("service_cidr udp_ports") && msg.contains("/etc/edgeproxy/mine.json"), "{msg}");

    // /etc/edgeproxy/config.json, which the binary reads by itself, counts as config_file.
    let router = Router { files: vec![("/etc/edgeproxy/config.json", "{}".into())], ..Router::default() };
    let uci = "config edgeproxy 'main'\n\toption enabled '1'\n\toption udp_ports '20000-20999'\n";
    let (p, _) = run_init_on(&router, uci, "start_service", "");
    assert!(!p.instances[0]["command"].iter().any(|a| a == "--config"));
    let msg = p.commands("logger")[0].join(" ");
    assert!(msg.contains("daemon.warn") && msg.contains("/etc/edgeproxy/config.json"), "{msg}");
}

#[test]
fn procd_state_dir_empty_turns_the_cache_off() {
    let uci = "config edgeproxy 'main'\n\toption enabled '1'\n\toption state_dir ''\n";
    let (p, _) = run_init_on(&Router::least_privilege(), uci, "start_service", "");
    let cmd = &p.instances[0]["command"];
    let at = cmd.iter().position(|a| a == "--state-dir").expect("--state-dir");
    assert_eq!(cmd[at + 1], "");
    assert_eq!(p.commands("chown"), [vec!["-R", "edgeproxy:edgeproxy", "/var/run/edgeproxy"]]);
}

#[test]
fn procd_service_stopped_cleans_up_with_the_configured_backend() {
    let uci = "config edgeproxy 'main'\n\toption enabled '1'\n\toption iptables_backend 'legacy'\n";
    // PROG replaced by a stub that records its arguments.
    let extra = "PROG=\"$STUB_DIR/fake-edgeproxy\"\nprintf '#!/bin/sh\\necho \"$*\" >\"$STUB_DIR/cleanup.args\"\\n' >\"$PROG\"\nchmod +x \"$PROG\"";
    let (_, out) = run_init(uci, "service_stopped\ncat \"$STUB_DIR/cleanup.args\"", extra);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "cleanup --iptables-backend legacy --run-dir /var/run/edgeproxy"
    );
    // A restart leaves the rules for the next agent: the marker is written, no cleanup runs; the
    // start after it gives the run directory (marker included) to the agent's user.
    let (p, out) = run_init_on(
        &Router::least_privilege(),
        uci,
        "mark_restart\nservice_stopped\nstart_service\nls \"$RUN_DIR\"; cat \"$STUB_DIR/cleanup.args\" 2>/dev/null || echo no-cleanup",
        extra,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>(), ["restart", "no-cleanup"]);
    assert_eq!(p.commands("chown")[0], ["-R", "edgeproxy:edgeproxy", "/var/run/edgeproxy"]);
}

// ----------------------------------------------------------------------------------------------
// systemd

/// The unit with its binary path pointed at the real, built binary.
fn unit_for_test(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(repo().join("systemd/edgeproxy.service")).unwrap();
    assert!(text.contains("/usr/local/bin/edgeproxy"));
    let unit = dir.join("edgeproxy.service");
    fs::write(&unit, text.replace("/usr/local/bin/edgeproxy", BIN)).unwrap();
    unit
}

#[test]
#[ignore = "needs systemd-analyze (tests/setup.sh installs it)"]
fn systemd_unit_verifies_without_warnings() {
    let dir = TempDir::new("pkg", "unit");
    let unit = unit_for_test(dir.path());
    let o = output(Command::new("systemd-analyze").arg("verify").arg(&unit));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.trim().is_empty(), "systemd-analyze verify: {}\n{err}", o.status);

    // Control: the same check notices an unknown directive and a missing binary.
    let text = fs::read_to_string(&unit).unwrap();
    fs::write(&unit, text.replace("LimitNOFILE=", "LimitNOFILEZ=")).unwrap();
    let o = output(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Unknown key"), "verify did not flag an unknown key");
    fs::write(&unit, text.replace(BIN, "/nonexistent/edgeproxy")).unwrap();
    assert!(!output(Command::new("systemd-analyze").arg("verify").arg(&unit)).status.success());
}

#[test]
fn systemd_unit_has_what_the_issue_asks() {
    let text = fs::read_to_string(repo().join("systemd/edgeproxy.service")).unwrap();
    let directives: Vec<(&str, &str)> =
        text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| directives.iter().filter(|(d, _)| *d == k).map(|(_, v)| *v).collect::<Vec<_>>();
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("Restart"), ["always"]);
    assert_eq!(get("WatchdogSec").len(), 1);
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_ADMIN CAP_NET_RAW"]);
    assert_eq!(get("ReadWritePaths"), ["-/run/xtables.lock"]);
    assert_eq!(get("ProtectSystem"), ["strict"]);
    // A restart with a broken config must not leave the node without a proxy: no ExecStartPre
    // check; the agent falls back to the last good config, and reload validates.
    assert!(get("ExecStartPre").is_empty(), "{:?}", get("ExecStartPre"));
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get("RuntimeDirectory"), ["edgeproxy"]);
    assert_eq!(get("RuntimeDirectoryPreserve"), ["restart"]);
    assert_eq!(get("StateDirectory"), ["edgeproxy"]);
    let after = get("After").join(" ");
    assert!(after.contains("kube-proxy.service") && after.contains("edgecore.service"), "{after}");
    assert_eq!(get("LimitNOFILE"), ["65536"]);
    let af = get("RestrictAddressFamilies").join(" ");
    assert!(af.contains("AF_UNIX"), "sd_notify needs AF_UNIX: {af}");
}

#[test]
#[ignore = "needs systemd-analyze (tests/setup.sh installs it)"]
fn systemd_security_exposure_is_at_most_2_5() {
    let dir = TempDir::new("pkg", "sec");
    let unit = unit_for_test(dir.path());
    let out = ok(Command::new("systemd-analyze").args(["security", "--offline=yes", "--no-pager"]).arg(&unit));
    let line =
        out.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("no score in\n{out}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    println!("systemd-analyze security: {score}");
    assert!(score <= 2.5, "exposure {score} > 2.5:\n{out}");
}

#[test]
#[ignore = "needs systemd-tmpfiles (tests/setup.sh installs it)"]
fn tmpfiles_creates_the_xtables_lock() {
    let root = TempDir::new("pkg", "tmpfiles");
    ok(Command::new("systemd-tmpfiles")
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/edgeproxy.tmpfiles")));
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(root.path().join("run/xtables.lock")).expect("/run/xtables.lock created");
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
}

#[test]
fn systemd_sample_config_is_valid_and_turns_metrics_on() {
    let path = repo().join("systemd/config.json");
    let c = edgeproxy::config::Config::load(Some(&path), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.metrics_address, Some("127.0.0.1:10551".parse().unwrap()));
    assert_eq!(c.source.meta_server, "http://127.0.0.1:10550");
}

// ----------------------------------------------------------------------------------------------
// OpenWrt feed Makefile

#[test]
fn openwrt_makefile_matches_the_crate() {
    let mk = fs::read_to_string(repo().join("openwrt/edgeproxy/Makefile")).unwrap();
    let var = |k: &str| {
        mk.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:=")))
            .unwrap_or_else(|| panic!("{k} missing from the Makefile"))
            .trim()
            .to_string()
    };
    assert_eq!(var("PKG_VERSION"), cargo_version(), "PKG_VERSION follows Cargo.toml");
    assert_eq!(var("PKG_NAME"), "edgeproxy");
    assert_eq!(var("PKG_BUILD_DEPENDS"), "rust/host");
    // rust-package.mk from a src-link feed or from inside the packages feed (tests/openwrt_feed.rs
    // runs make on both).
    assert!(mk.contains("$(TOPDIR)/feeds/packages/lang/rust/rust-package.mk"));
    assert!(mk.contains("$(CURDIR)/../../lang/rust/rust-package.mk"));
    assert!(mk.contains("include $(EDGEPROXY_RUST_PACKAGE_MK)"));
    assert!(mk.contains("$(eval $(call RustBinPackage,edgeproxy))"));
    assert!(mk.contains("$(eval $(call BuildPackage,edgeproxy))"));
    let deps = var("  DEPENDS");
    for d in ["$(RUST_ARCH_DEPENDS)", "+nftables-json", "+kmod-nft-nat"] {
        assert!(deps.split_whitespace().any(|x| x == d), "{d} missing from DEPENDS {deps}");
    }
    // The binary adds its addresses over rtnetlink: no `ip` (ip-tiny, ip-full) at run time.
    assert!(!deps.split_whitespace().any(|x| x.trim_start_matches('+').starts_with("ip-")), "{deps}");
    // Recipe lines must start with a tab, or make fails on them.
    let mut in_define = false;
    for l in mk.lines() {
        if l.starts_with("define ") {
            in_define = true;
        } else if l == "endef" {
            in_define = false;
        } else if in_define && l.starts_with("\t$(") {
            // ok: recipe line
        } else if in_define && l.starts_with("    $(") {
            panic!("recipe indented with spaces: {l:?}");
        }
    }
}
