//! The `headcni` CNI plugin: ADD, DEL, CHECK, STATUS and GC for routed veth attachments, with
//! the IPAM delegated to `host-local`, `headcni-ipam` or any IPAM plugin on CNI_PATH.

pub mod config;
pub mod dataplane;

use crate::cni::{self, CniError, CniResult, Command, Interface, IpConfig, Request, code, delegate};
use crate::events::{self, Event};
use crate::netlink::{Netlink, NetlinkError, Netns};
use config::{Network, PluginConfig};
use dataplane::{Attachment, DataplaneError, PodAddress};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

/// Name of the plugin binary and of its `type` in a conflist.
pub const PLUGIN_NAME: &str = "headcni";

impl From<DataplaneError> for CniError {
    fn from(e: DataplaneError) -> Self {
        CniError::internal(e.to_string())
    }
}

impl From<NetlinkError> for CniError {
    fn from(e: NetlinkError) -> Self {
        CniError::internal(e.to_string())
    }
}

/// The `headcni` plugin.
#[derive(Debug, Default)]
pub struct HeadCni;

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| CniError::internal(format!("starting the netlink runtime: {e}")))
}

fn open_netns(req: &Request) -> Result<Netns, CniError> {
    let path = req.netns.as_deref().ok_or_else(|| CniError::invalid_env("CNI_NETNS is required"))?;
    Netns::open(path).map_err(|e| CniError::invalid_env(format!("CNI_NETNS {}: {e}", path.display())))
}

/// Runs the IPAM delegate named in the config: `headcni-ipam` in this very process (the same
/// code and result as exec'ing it, without the fork and exec), anything else through CNI_PATH
/// as the spec describes. A delegate built before spec 1.1 gets its newest version for
/// ADD/DEL/CHECK, and is skipped for STATUS and GC, which it does not know.
fn ipam(
    req: &Request,
    ipam_config: Map<String, Value>,
    kind: &str,
    command: Command,
) -> Result<Option<Value>, CniError> {
    let sub = Request { command, ..req.with_config(ipam_config) };
    if kind == crate::ipam::PLUGIN_NAME {
        return crate::ipam::run_in_process(&sub);
    }
    if matches!(command, Command::Status | Command::Gc)
        && !delegate::versions(&sub, kind)?.contains(&cni::CniVersion::V1_1_0)
    {
        log::debug!("IPAM plugin {kind} predates {command}; nothing to forward");
        return Ok(None);
    }
    delegate::exec_negotiated(&sub, kind, command)
}

fn record(cfg: &PluginConfig, events: &[Event]) {
    events::record(&cfg.run_dir, events);
}

impl HeadCni {
    fn attachment(req: &Request, net: &Network, addresses: Vec<PodAddress>, ipam_routes: &[cni::Route]) -> Attachment {
        let routes = Attachment::effective_routes(&addresses, ipam_routes);
        Attachment {
            ifname: req.ifname.clone(),
            host_name: dataplane::host_veth_name(&req.container_id, &req.ifname),
            alias: dataplane::link_alias(&req.network, &req.container_id, &req.ifname),
            mtu: net.mtu,
            addresses,
            routes,
        }
    }

    fn add_attachment(&self, req: &Request, cfg: &PluginConfig) -> Result<CniResult, CniError> {
        let net = cfg.resolve(req, &[])?;
        let rt = runtime()?;
        let pod_ns = open_netns(req)?;
        let host_ns = Netns::current().map_err(|e| CniError::internal(format!("opening the host namespace: {e}")))?;
        if matches!((pod_ns.id(), host_ns.id()), (Ok(pod), Ok(host)) if pod == host) {
            return Err(CniError::invalid_env("CNI_NETNS is the plugin's own network namespace"));
        }
        let host_name = dataplane::host_veth_name(&req.container_id, &req.ifname);

        rt.block_on(async {
            let host = Netlink::connect()?;
            let pod = Netlink::connect_in(&pod_ns)?;
            if pod.link(&req.ifname).await?.is_some() {
                return Err(CniError::new(
                    code::INTERFACE_EXISTS,
                    format!("interface {} already exists in {}", req.ifname, pod_ns.path().display()),
                ));
            }
            // A host end without its pod end is what a killed ADD leaves behind: ours to remove.
            dataplane::detach(&host, &host_name).await?;

            let ipam_out = ipam(req, net.ipam_config.clone(), &cfg.ipam.kind, Command::Add)?
                .ok_or_else(|| CniError::internal(format!("IPAM plugin {} returned no result", cfg.ipam.kind)))?;
            let outcome = async {
                let ipam_result = CniResult::from_value(&ipam_out)?;
                if ipam_result.ips.is_empty() {
                    return Err(CniError::internal(format!("IPAM plugin {} returned no address", cfg.ipam.kind)));
                }
                let addresses = ipam_result.ips.iter().map(PodAddress::from_ipam).collect::<Result<Vec<_>, _>>()?;
                let att = Self::attachment(req, &net, addresses, &ipam_result.routes);
                dataplane::enable_forwarding(&att.addresses)?;
                let attached = dataplane::attach(&host, &pod, &host_ns, &pod_ns, &att).await?;
                Ok(Self::result(req, &net, cfg, &att, &attached, &ipam_result))
            }
            .await;
            if let Err(err) = &outcome {
                log::warn!("ADD {} failed, rolling back: {err}", req.container_id);
                if let Err(e) = dataplane::detach(&host, &host_name).await {
                    log::error!("rollback: removing {host_name}: {e}");
                }
                if let Err(e) = ipam(req, net.ipam_config.clone(), &cfg.ipam.kind, Command::Del) {
                    log::error!("rollback: releasing the address: {e}");
                }
            }
            outcome
        })
    }

    fn result(
        req: &Request,
        net: &Network,
        cfg: &PluginConfig,
        att: &Attachment,
        attached: &dataplane::Attached,
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

impl cni::Plugin for HeadCni {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let started = Instant::now();
        let cfg = PluginConfig::from_request(req)?;
        let outcome = self.add_attachment(req, &cfg);
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
    /// already gone; reports every failure together.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let prev = req.prev_result().unwrap_or_else(|e| {
            log::warn!("DEL {}: ignoring unreadable prevResult: {e}", req.container_id);
            None
        });
        let mut failures: Vec<CniError> = Vec::new();

        match cfg.resolve(req, &config::subnets_of(prev.as_ref())) {
            Ok(net) => match ipam(req, net.ipam_config, &cfg.ipam.kind, Command::Del) {
                Ok(_) => {
                    if Self::delegates_ip_events(&cfg) {
                        let evs: Vec<Event> = prev
                            .iter()
                            .flat_map(|p| p.ips.iter())
                            .map(|ip| Event::IpReleased { ipv6: ip.address.is_ipv6() })
                            .collect();
                        record(&cfg, &evs);
                    }
                }
                Err(e) => failures.push(e),
            },
            // Nothing tells which range to release from; headcni-ipam releases by container
            // and needs none, others get the config as it is.
            Err(_) => {
                if let Err(e) = ipam(req, req.config.clone(), &cfg.ipam.kind, Command::Del) {
                    failures.push(e);
                }
            }
        }

        let host_name = dataplane::host_veth_name(&req.container_id, &req.ifname);
        match runtime().and_then(|rt| {
            rt.block_on(async {
                let host = Netlink::connect()?;
                Ok(dataplane::detach(&host, &host_name).await?)
            })
        }) {
            Ok(existed) => log::info!(
                "DEL {} {}: veth {host_name} {}",
                req.container_id,
                req.ifname,
                if existed { "removed" } else { "already gone" }
            ),
            Err(e) => failures.push(e),
        }

        match failures.len() {
            0 => Ok(()),
            _ => {
                record(&cfg, &[Event::NetworkError { operation: "del".into() }]);
                let code = failures[0].code;
                let msg = failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
                Err(CniError::new(code, format!("DEL finished with errors: {msg}")))
            }
        }
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let prev =
            req.prev_result()?.ok_or_else(|| CniError::invalid_config("CHECK needs prevResult (the result of ADD)"))?;
        let net = cfg.resolve(req, &config::subnets_of(Some(&prev)))?;
        ipam(req, net.ipam_config.clone(), &cfg.ipam.kind, Command::Check)?;

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
            .map(PodAddress::from_ipam)
            .collect::<Result<Vec<_>, _>>()?;
        let mut att = Self::attachment(req, &net, addresses, &prev.routes);
        // A later plugin in the chain (tuning) may have changed the MTU and said so.
        att.mtu = pod_iface.mtu.unwrap_or(net.mtu);

        let pod_ns = open_netns(req)?;
        let problems = runtime()?.block_on(async {
            let host = Netlink::connect()?;
            let pod = Netlink::connect_in(&pod_ns)?;
            Ok::<_, CniError>(dataplane::check(&host, &pod, &att, pod_iface.mac.as_deref()).await?)
        })?;
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
        ipam(req, net.ipam_config, &cfg.ipam.kind, Command::Status).map(|_| ())
    }

    /// Removes this network's veth pairs whose attachment is no longer valid, then forwards GC
    /// to the IPAM delegate. Keeps going past failures and reports them all.
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let cfg = PluginConfig::from_request(req)?;
        let valid: HashSet<(String, String)> =
            req.valid_attachments()?.into_iter().map(|a| (a.container_id, a.ifname)).collect();
        let mut failures: Vec<String> = Vec::new();

        let removed = runtime().and_then(|rt| {
            rt.block_on(async {
                let host = Netlink::connect()?;
                let mut removed = 0;
                for link in host.links().await? {
                    let Some((network, cid, ifname)) = link.alias.as_deref().and_then(dataplane::parse_link_alias)
                    else {
                        continue;
                    };
                    if network != req.network || valid.contains(&(cid.to_string(), ifname.to_string())) {
                        continue;
                    }
                    match host.delete_link(link.index).await {
                        Ok(_) => removed += 1,
                        Err(e) => failures.push(format!("removing stale {}: {e}", link.name)),
                    }
                }
                Ok::<_, CniError>(removed)
            })
        });
        match removed {
            Ok(n) if n > 0 => log::info!("GC removed {n} stale veth pairs of network {}", req.network),
            Ok(_) => {}
            Err(e) => failures.push(e.to_string()),
        }

        let ipam_config = cfg.resolve(req, &[]).map(|n| n.ipam_config).unwrap_or_else(|_| req.config.clone());
        if let Err(e) = ipam(req, ipam_config, &cfg.ipam.kind, Command::Gc) {
            failures.push(e.to_string());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::internal(format!("GC finished with errors: {}", failures.join("; "))))
        }
    }
}

/// Entry point of the plugin role: env, stdin and stdout of the process.
pub fn main() -> i32 {
    cni::main(&HeadCni, &|command, config| crate::logging::init_plugin(PLUGIN_NAME, command, config))
}
