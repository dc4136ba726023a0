//! The `headcni` CNI plugin: ADD, DEL, CHECK, STATUS and GC for routed veth attachments, with
//! the IPAM delegated to `host-local`, `headcni-ipam` or any IPAM plugin on CNI_PATH.
//!
//! - this file: the verbs' logic, over two seams;
//! - [`config`]: the plugin's configuration, resolved against the node file;
//! - [`attachment`]: what one attachment is (names, addresses, routes), pure;
//! - [`dataplane`]: the kernel operations behind the [`Dataplane`] trait ([`KernelDataplane`]);
//! - [`ipam`]: the IPAM delegation behind the [`IpamDelegate`] trait ([`DelegatedIpam`]).
//!
//! With the seams' fakes (`fake`) the verbs, the rollback of a failed ADD included, are unit
//! tested without root; tests/plugin_netns.rs runs them against the kernel.

pub mod attachment;
pub mod config;
pub mod dataplane;
#[cfg(test)]
mod fake;
pub mod ipam;
#[cfg(test)]
mod tests;

use crate::cni::{self, CniError, CniResult, Command, Interface, IpConfig, Request, code};
use crate::errors::ErrorList;
use crate::events::{self, Event};
use attachment::{Attached, AttachmentSpec, PodAddress};
use config::{Network, PluginConfig};
pub use dataplane::{Dataplane, DataplaneError, KernelDataplane};
pub use ipam::{DelegatedIpam, IpamDelegate};
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

/// Name of the plugin binary and of its `type` in a conflist.
pub const PLUGIN_NAME: &str = "headcni";

/// The `headcni` plugin over its two seams: the kernel and the IPAM delegate.
#[derive(Debug, Default)]
pub struct HeadCni<D = KernelDataplane, I = DelegatedIpam> {
    dataplane: D,
    ipam: I,
}

fn record(cfg: &PluginConfig, events: &[Event]) {
    events::record(&cfg.run_dir, events);
}

fn pod_netns(req: &Request) -> Result<&Path, CniError> {
    req.netns.as_deref().ok_or_else(|| CniError::invalid_env("CNI_NETNS is required"))
}

impl<D: Dataplane, I: IpamDelegate> HeadCni<D, I> {
    pub fn new(dataplane: D, ipam: I) -> Self {
        Self { dataplane, ipam }
    }

    fn spec(
        req: &Request,
        cfg: &PluginConfig,
        net: &Network,
        addresses: Vec<PodAddress>,
        ipam_routes: &[cni::Route],
    ) -> AttachmentSpec {
        let routes = AttachmentSpec::effective_routes(&addresses, ipam_routes);
        let namespace = req.arg("K8S_POD_NAMESPACE").filter(|ns| !ns.is_empty());
        AttachmentSpec {
            group: namespace.filter(|_| cfg.enable_network_policy).map(crate::podgroup::namespace_group),
            ifname: req.ifname.clone(),
            host_name: attachment::host_veth_name(&req.container_id, &req.ifname),
            alias: attachment::link_alias(&req.network, &req.container_id, &req.ifname),
            mtu: net.mtu,
            shape: attachment::shape_of(&addresses),
            addresses,
            routes,
        }
    }

    fn ipam(
        &self,
        req: &Request,
        cfg: &PluginConfig,
        config: serde_json::Map<String, serde_json::Value>,
        command: Command,
    ) -> Result<Option<serde_json::Value>, CniError> {
        self.ipam.run(req, config, &cfg.ipam.kind, command, cfg.delegate_timeout)
    }

    fn add_attachment(&self, req: &Request, cfg: &PluginConfig) -> Result<CniResult, CniError> {
        let net = cfg.resolve(req, &[])?;
        let pod = self.dataplane.open_pod(pod_netns(req)?)?;
        if self.dataplane.pod_has_link(&pod, &req.ifname)? {
            return Err(CniError::new(
                code::INTERFACE_EXISTS,
                format!("interface {} already exists in {}", req.ifname, pod_netns(req)?.display()),
            ));
        }
        let host_name = attachment::host_veth_name(&req.container_id, &req.ifname);
        // A host end without its pod end is what a killed ADD leaves behind: ours to remove.
        self.dataplane.detach(&host_name)?;
        // No pod veth without the guard that keeps its pod to its own addresses.
        if self.dataplane.ensure_guard()? {
            log::info!("created the anti-spoofing guard (nft table inet {})", crate::podguard::TABLE);
        }

        let ipam_out = self
            .ipam(req, cfg, net.ipam_config.clone(), Command::Add)?
            .ok_or_else(|| CniError::internal(format!("IPAM plugin {} returned no result", cfg.ipam.kind)))?;
        let outcome = (|| {
            let ipam_result = CniResult::from_value(&ipam_out)?;
            if ipam_result.ips.is_empty() {
                return Err(CniError::internal(format!("IPAM plugin {} returned no address", cfg.ipam.kind)));
            }
            let addresses: Vec<PodAddress> = ipam_result.ips.iter().map(PodAddress::from_ipam).collect();
            let spec = Self::spec(req, cfg, &net, addresses, &ipam_result.routes);
            let ipv4 = spec.addresses.iter().any(|a| a.address.is_ipv4());
            let ipv6 = spec.addresses.iter().any(|a| a.address.is_ipv6());
            self.dataplane.enable_forwarding(ipv4, ipv6)?;
            let attached = self.dataplane.attach(&pod, &spec)?;
            Ok(Self::result(req, &net, cfg, &spec, &attached, &ipam_result))
        })();
        if let Err(err) = &outcome {
            log::warn!("ADD {} failed, rolling back: {err}", req.container_id);
            if let Err(e) = self.dataplane.detach(&host_name) {
                log::error!("rollback: removing {host_name}: {e}");
            }
            if let Err(e) = self.ipam(req, cfg, net.ipam_config.clone(), Command::Del) {
                log::error!("rollback: releasing the address: {e}");
            }
        }
        outcome
    }

    fn result(
        req: &Request,
        net: &Network,
        cfg: &PluginConfig,
        att: &AttachmentSpec,
        attached: &Attached,
        ipam_result: &CniResult,
    ) -> CniResult {
        let interfaces = vec![
            Interface {
                name: attached.host.name.clone(),
                mac: attached.host.mac.clone(),
                mtu: Some(net.mtu),
                ..Default::default()
            },
            Interface {
                name: attached.pod.name.clone(),
                mac: attached.pod.mac.clone(),
                mtu: Some(net.mtu),
                sandbox: req.netns.as_ref().map(|p| p.display().to_string()),
                ..Default::default()
            },
        ];
        let ips = att
            .addresses
            .iter()
            .map(|a| IpConfig { address: a.address, gateway: Some(a.gateway), interface: Some(1) })
            .collect();
        let routes = att.routes.iter().map(|r| cni::Route { gw: att.gateway_for(r), ..r.clone() }).collect();
        let dns = if cfg.dns.is_empty() { ipam_result.dns.clone() } else { cfg.dns.clone() };
        CniResult { interfaces, ips, routes, dns }
    }

    fn delegates_ip_events(cfg: &PluginConfig) -> bool {
        // headcni-ipam reports its own allocations; for other IPAM plugins the plugin does.
        cfg.ipam.kind != crate::ipam::PLUGIN_NAME
    }
}

impl<D: Dataplane, I: IpamDelegate> cni::Plugin for HeadCni<D, I> {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let started = Instant::now();
        let cfg = PluginConfig::from_request(req)?;
        let outcome = self.add_attachment(req, &cfg);
        self.dataplane.close();
        match &outcome {
            Ok(result) => {
                let mut evs = vec![Event::PodSetup { seconds: started.elapsed().as_secs_f64() }];
                if Self::delegates_ip_events(&cfg) {
                    evs.extend(result.ips.iter().map(|ip| Event::IpAllocated { ipv6: ip.address.is_ipv6() }));
                }
                record(&cfg, &evs);
                log::info!(
                    "ADD {} {} -> {} in {:.1} ms",
                    req.container_id,
                    req.ifname,
                    result.ips.iter().map(|i| i.address.to_string()).collect::<Vec<_>>().join(","),
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            Err(_) => record(&cfg, &[Event::NetworkError { operation: "add".into() }]),
        }
        outcome
    }

    /// Best effort: releases the address and removes the veth pair, tolerating everything
    /// already gone; reports every failure together ([`CniError::from_list`]).
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let started = Instant::now();
        let cfg = PluginConfig::from_request(req)?;
        let prev = req.prev_result().unwrap_or_else(|e| {
            log::warn!("DEL {}: ignoring unreadable prevResult: {e}", req.container_id);
            None
        });
        let mut failures: ErrorList<CniError> = ErrorList::new();

        match cfg.resolve(req, &config::subnets_of(prev.as_ref())) {
            Ok(net) => {
                if failures.keep(self.ipam(req, &cfg, net.ipam_config, Command::Del)).is_some()
                    && Self::delegates_ip_events(&cfg)
                {
                    let evs: Vec<Event> = prev
                        .iter()
                        .flat_map(|p| p.ips.iter())
                        .map(|ip| Event::IpReleased { ipv6: ip.address.is_ipv6() })
                        .collect();
                    record(&cfg, &evs);
                }
            }
            // Nothing tells which range to release from; headcni-ipam releases by container
            // and needs none, others get the config as it is.
            Err(_) => {
                failures.keep(self.ipam(req, &cfg, req.config.clone(), Command::Del));
            }
        }

        let host_name = attachment::host_veth_name(&req.container_id, &req.ifname);
        let detached = self.dataplane.detach(&host_name).map_err(CniError::from);
        self.dataplane.close();
        if let Some(existed) = failures.keep(detached) {
            log::info!(
                "DEL {} {}: veth {host_name} {}",
                req.container_id,
                req.ifname,
                if existed { "removed" } else { "already gone" }
            );
        }
        if failures.is_empty() {
            record(&cfg, &[Event::PodTeardown { seconds: started.elapsed().as_secs_f64() }]);
        } else {
            record(&cfg, &[Event::NetworkError { operation: "del".into() }]);
        }
        CniError::from_list("DEL", failures)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let prev =
            req.prev_result()?.ok_or_else(|| CniError::invalid_config("CHECK needs prevResult (the result of ADD)"))?;
        let net = cfg.resolve(req, &config::subnets_of(Some(&prev)))?;
        self.ipam(req, &cfg, net.ipam_config.clone(), Command::Check)?;

        let pod_index =
            prev.interfaces.iter().position(|i| i.name == req.ifname && i.sandbox.is_some()).ok_or_else(|| {
                CniError::new(code::CHECK_FAILED, format!("prevResult has no interface {} in a sandbox", req.ifname))
            })?;
        let pod_iface = &prev.interfaces[pod_index];
        if let (Some(sandbox), Some(netns)) = (&pod_iface.sandbox, &req.netns)
            && Path::new(sandbox) != netns
        {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!("interface {} is in sandbox {sandbox}, not in CNI_NETNS {}", req.ifname, netns.display()),
            ));
        }
        let addresses = prev
            .ips
            .iter()
            .filter(|ip| ip.interface.is_none_or(|i| i == pod_index))
            .map(PodAddress::from_result)
            .collect::<Result<Vec<_>, _>>()?;
        let mut spec = Self::spec(req, &cfg, &net, addresses, &prev.routes);
        // A later plugin in the chain (tuning) may have changed the MTU and said so.
        spec.mtu = pod_iface.mtu.unwrap_or(net.mtu);

        let pod = self.dataplane.open_pod(pod_netns(req)?)?;
        let problems = self.dataplane.check(&pod, &spec, pod_iface.mac.as_deref());
        drop(pod);
        self.dataplane.close();
        let problems = problems?;
        if problems.is_empty() {
            Ok(())
        } else {
            record(&cfg, &[Event::NetworkError { operation: "check".into() }]);
            Err(CniError::new(code::CHECK_FAILED, format!("attachment {} {} drifted", req.container_id, req.ifname))
                .with_details(problems.join("; ")))
        }
    }

    /// Ready when a pod CIDR is known (config or node file) and the IPAM delegate is ready.
    fn status(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let net = cfg
            .resolve(req, &[])
            .map_err(|e| if e.code == code::TRY_AGAIN_LATER { CniError::new(code::NOT_AVAILABLE, e.msg) } else { e })?;
        self.ipam(req, &cfg, net.ipam_config, Command::Status).map(|_| ())
    }

    /// Removes this network's veth pairs whose attachment is no longer valid, then forwards GC
    /// to the IPAM delegate. Keeps going past failures and reports them all
    /// ([`CniError::from_list`]).
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let valid: HashSet<(String, String)> =
            req.valid_attachments()?.into_iter().map(|a| (a.container_id, a.ifname)).collect();
        let mut failures: ErrorList<CniError> = ErrorList::new();

        let mut removed = 0;
        if let Some(links) = failures.keep(self.dataplane.host_links().map_err(CniError::from)) {
            for link in links {
                let Some((network, cid, ifname)) = attachment::parse_link_alias(&link.alias) else { continue };
                if network != req.network || valid.contains(&(cid.to_string(), ifname.to_string())) {
                    continue;
                }
                match self.dataplane.detach(&link.name) {
                    Ok(_) => removed += 1,
                    Err(e) => failures.push(CniError::internal(format!("removing stale {}: {e}", link.name))),
                }
            }
        }
        self.dataplane.close();
        if removed > 0 {
            log::info!("GC removed {removed} stale veth pairs of network {}", req.network);
        }

        let ipam_config = cfg.resolve(req, &[]).map(|n| n.ipam_config).unwrap_or_else(|_| req.config.clone());
        failures.keep(self.ipam(req, &cfg, ipam_config, Command::Gc));
        CniError::from_list("GC", failures)
    }
}

/// Entry point of the plugin role: env, stdin and stdout of the process, the kernel, and the
/// IPAM plugin the configuration names.
pub fn main() -> i32 {
    let plugin = HeadCni::new(KernelDataplane::new(), DelegatedIpam);
    cni::main(&plugin, &|command, config| crate::logging::init_plugin(PLUGIN_NAME, command, config))
}
