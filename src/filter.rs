//! The service filter: which Services edgeproxy proxies, and why. A pure function of the Service,
//! the filter settings and one fact about the node (is kube-proxy there?).
//!
//! Every rule that applies can only *ignore* a service; a service is proxied when none does. The
//! order below fixes which reason is reported when several apply.

use std::fmt;

use crate::model::{Service, ServiceType};

/// EdgeMesh's label (v1.10+). Only the key counts; any value, the empty string included.
pub const PROXY_NAME_LABEL: &str = "service.edgemesh.kubeedge.io/service-proxy-name";
/// EdgeMesh v1.9's opt-out label and the one value that means "do not proxy".
pub const NO_PROXY_LABEL: (&str, &str) = ("noproxy", "edgemesh");

/// EdgeMesh's `serviceFilterMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterMode {
    /// Proxy everything except services that carry the label (default).
    FilterIfLabelExists,
    /// Proxy only services that carry the label.
    FilterIfLabelDoesNotExists,
    /// The label means nothing (EdgeMesh v1.9 did not know it).
    None,
}

/// An EdgeMesh generation that a setting of `edgemesh` reproduces: it chooses the defaults of
/// the filter and the layout, every one still overridable on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// EdgeMesh v1.13-v1.17 (the newest; the default): `portals`, `serviceFilterMode`
    /// honoured, `noproxy=edgemesh` not (v1.10 removed it).
    V1_17,
    /// EdgeMesh v1.8/v1.9: `root-chain`, `noproxy=edgemesh` honoured, the `service-proxy-name`
    /// label unknown.
    V1_9,
}

impl Profile {
    /// (serviceFilterMode, noProxyLabel) of this generation.
    pub fn filter_defaults(self) -> (FilterMode, bool) {
        match self {
            Profile::V1_17 => (FilterMode::FilterIfLabelExists, false),
            Profile::V1_9 => (FilterMode::None, true),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::V1_17 => "v1.17",
            Profile::V1_9 => "v1.9",
        })
    }
}

/// Whether `default/kubernetes` and kube-system's `k8s-app=kube-dns` services are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultIgnores {
    /// Ignored when kube-proxy serves them on this node, proxied when nobody else would.
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub mode: FilterMode,
    pub no_proxy_label: bool,
    pub default_ignores: DefaultIgnores,
}

impl Default for FilterConfig {
    fn default() -> Self {
        let (mode, no_proxy_label) = Profile::V1_17.filter_defaults();
        FilterConfig { mode, no_proxy_label, default_ignores: DefaultIgnores::Auto }
    }
}

/// Why a service is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IgnoreReason {
    Headless,
    ExternalName,
    NoClusterIp,
    LabelPresent,
    LabelAbsent,
    NoProxyLabel,
    /// `default/kubernetes` or a kube-system kube-dns service; the flag says whether it is
    /// because kube-proxy is present (`auto`) or forced (`on`).
    DefaultIgnore {
        kube_proxy: bool,
    },
}

/// The filter's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Proxy,
    Ignore(IgnoreReason),
}

impl Verdict {
    pub fn is_proxied(self) -> bool {
        self == Verdict::Proxy
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self {
            Verdict::Proxy => return f.write_str("proxied: no ignore rule applies"),
            Verdict::Ignore(r) => r,
        };
        f.write_str("ignored: ")?;
        match reason {
            IgnoreReason::Headless => f.write_str("headless service (clusterIP: None)"),
            IgnoreReason::ExternalName => f.write_str("ExternalName service"),
            IgnoreReason::NoClusterIp => f.write_str("no cluster IP"),
            IgnoreReason::LabelPresent => {
                write!(f, "label {PROXY_NAME_LABEL} is set (serviceFilterMode FilterIfLabelExists)")
            }
            IgnoreReason::LabelAbsent => {
                write!(f, "label {PROXY_NAME_LABEL} is not set (serviceFilterMode FilterIfLabelDoesNotExists)")
            }
            IgnoreReason::NoProxyLabel => f.write_str("label noproxy=edgemesh"),
            IgnoreReason::DefaultIgnore { kube_proxy: true } => {
                f.write_str("default ignore (kube-proxy serves it on this node)")
            }
            IgnoreReason::DefaultIgnore { kube_proxy: false } => f.write_str("default ignore (defaultIgnores: on)"),
        }
    }
}

/// Is this one of the services EdgeMesh v1.9 ignored by default?
pub fn is_default_ignore(svc: &Service) -> bool {
    let k = &svc.key;
    (&*k.namespace == "default" && &*k.name == "kubernetes")
        || (&*k.namespace == "kube-system" && (svc.label("k8s-app") == Some("kube-dns") || &*k.name == "coredns"))
}

/// The verdict for one service.
pub fn verdict(svc: &Service, cfg: &FilterConfig, kube_proxy_present: bool) -> Verdict {
    use IgnoreReason::*;
    if svc.service_type == ServiceType::ExternalName {
        return Verdict::Ignore(ExternalName);
    }
    if svc.headless {
        return Verdict::Ignore(Headless);
    }
    if svc.cluster_ips.is_empty() {
        return Verdict::Ignore(NoClusterIp);
    }
    let labelled = svc.label(PROXY_NAME_LABEL).is_some();
    match cfg.mode {
        FilterMode::FilterIfLabelExists if labelled => return Verdict::Ignore(LabelPresent),
        FilterMode::FilterIfLabelDoesNotExists if !labelled => return Verdict::Ignore(LabelAbsent),
        _ => {}
    }
    if cfg.no_proxy_label && svc.label(NO_PROXY_LABEL.0) == Some(NO_PROXY_LABEL.1) {
        return Verdict::Ignore(NoProxyLabel);
    }
    if is_default_ignore(svc) {
        match cfg.default_ignores {
            DefaultIgnores::On => return Verdict::Ignore(DefaultIgnore { kube_proxy: false }),
            DefaultIgnores::Auto if kube_proxy_present => return Verdict::Ignore(DefaultIgnore { kube_proxy: true }),
            _ => {}
        }
    }
    Verdict::Proxy
}
