//! The SSRF guard: refuses to fetch from loopback, private, link-local, shared or
//! cloud-metadata addresses unless ALLOW_PRIVATE_NETWORKS is set or the host is allowlisted.
//!
//! It is a DNS resolver for reqwest, so the check applies to the address actually connected
//! to (no re-resolution gap), plus a URL check for IP literals and every redirect hop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::Url;

/// Where the service may fetch from.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    pub allow_private: bool,
    /// Hosts (exact names or IP literals) exempt from the private-address check.
    pub allowlist: Vec<String>,
}

/// A fetch the policy refused; the message says how to allow it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("refused to fetch {host}: it resolves to {addr}, a {kind} address (set ALLOW_PRIVATE_NETWORKS=true or add the host to NETWORK_ALLOWLIST)")]
pub struct Refused {
    pub host: String,
    pub addr: IpAddr,
    pub kind: &'static str,
}

impl NetworkPolicy {
    fn exempt(&self, host: &str) -> bool {
        self.allow_private
            || self
                .allowlist
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host.trim_matches(|c| c == '[' || c == ']')))
    }

    /// Checks an address `host` resolved to.
    pub fn check_addr(&self, host: &str, addr: IpAddr) -> Result<(), Refused> {
        if self.exempt(host) {
            return Ok(());
        }
        match forbidden_kind(addr) {
            Some(kind) => Err(Refused {
                host: host.to_owned(),
                addr,
                kind,
            }),
            None => Ok(()),
        }
    }

    /// Checks a URL before it is fetched: IP-literal hosts are checked here (no DNS happens
    /// for them); names are checked by the resolver.
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_addr(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_addr(&ip.to_string(), IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

impl NetworkPolicy {
    /// `url` ready to connect to for a client that resolves names itself (retina): its host
    /// resolved here and checked, then replaced by the first allowed address, so the
    /// connection goes where the check looked (no second lookup to rebind). Exempt hosts and
    /// IP literals are left as they are. `Err(None)`: the name does not resolve now.
    pub async fn pinned(&self, url: &Url) -> Result<Url, Option<Refused>> {
        self.check_url(url).map_err(Some)?;
        let Some(url::Host::Domain(host)) = url.host() else {
            return Ok(url.clone());
        };
        if self.exempt(host) {
            return Ok(url.clone());
        }
        let port = url.port_or_known_default().unwrap_or(554);
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
            Ok(addrs) => addrs.collect(),
            Err(_) => return Err(None),
        };
        let mut refused = None;
        for addr in resolved {
            match self.check_addr(host, addr.ip()) {
                Ok(()) => {
                    let mut pinned = url.clone();
                    let ip = match addr.ip() {
                        IpAddr::V4(ip) => ip.to_string(),
                        IpAddr::V6(ip) => format!("[{ip}]"),
                    };
                    pinned.set_host(Some(&ip)).map_err(|_| None)?;
                    return Ok(pinned);
                }
                Err(e) => refused = Some(e),
            }
        }
        Err(refused)
    }
}

/// Why an address is off limits, or `None` if it is a public unicast address.
pub fn forbidden_kind(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(ip) => v4_kind(ip),
        IpAddr::V6(ip) => {
            if let Some(v4) = ip.to_ipv4_mapped() {
                return v4_kind(v4);
            }
            v6_kind(ip)
        }
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local or cloud-metadata")
    } else if o[0] == 100 && (64..128).contains(&o[1]) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("broadcast, multicast or reserved")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        Some("private (unique local) or cloud-metadata")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64: the embedded IPv4 address decides.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        v4_kind(v4)
    } else {
        None
    }
}

/// reqwest resolver that drops refused addresses and fails if none is left.
pub struct GuardedResolver {
    pub policy: Arc<NetworkPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| match policy.check_addr(&host, a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                if let Some(e) = refused {
                    return Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The refusal inside a reqwest error chain, if that is what failed.
pub fn refusal(err: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<Refused>() {
            return Some(r.clone());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        forbidden_kind(s.parse().unwrap()).is_some()
    }

    #[test]
    fn classifies_addresses() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "255.255.255.255",
        ] {
            assert!(refused(bad), "{bad} should be refused");
        }
        for good in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "172.32.0.1"] {
            assert!(!refused(good), "{good} should be allowed");
        }
    }

    #[test]
    fn policy_exemptions() {
        let url = Url::parse("http://127.0.0.1:8080/a.m3u8").unwrap();
        assert!(NetworkPolicy::default().check_url(&url).is_err());
        assert!(NetworkPolicy {
            allow_private: true,
            allowlist: vec![]
        }
        .check_url(&url)
        .is_ok());
        assert!(NetworkPolicy {
            allow_private: false,
            allowlist: vec!["127.0.0.1".into()]
        }
        .check_url(&url)
        .is_ok());
        let msg = NetworkPolicy::default()
            .check_url(&url)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ALLOW_PRIVATE_NETWORKS"), "{msg}");
    }
}
