//! The kernel's floor for what the plugin does to a veth pair, for the benchmark: creates a
//! pair straight into a namespace, or deletes one, and prints the microseconds the netlink
//! request alone took (no process start, no IPAM, no routes).
//!
//! veth_floor create <netns-path> <host-name>    veth_floor delete <host-name>

use headcni::netlink::{Netlink, Netns};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async {
        let host = Netlink::connect()?;
        let elapsed = match args.get(1).map(String::as_str) {
            Some("create") => {
                let pod_ns = Netns::open(std::path::Path::new(&args[2]))?;
                let pod = Netlink::connect_in(&pod_ns)?;
                let host_ns = Netns::current()?;
                let start = Instant::now();
                pod.create_veth("eth0", &args[3], 1280, &host_ns).await?;
                start.elapsed()
            }
            Some("delete") => {
                let link = host.link(&args[2]).await?.ok_or_else(|| anyhow::anyhow!("no link {}", args[2]))?;
                let start = Instant::now();
                host.delete_link(link.index).await?;
                start.elapsed()
            }
            Some("delete-pod") => {
                let pod_ns = Netns::open(std::path::Path::new(&args[2]))?;
                let pod = Netlink::connect_in(&pod_ns)?;
                let link = pod.link("eth0").await?.ok_or_else(|| anyhow::anyhow!("no eth0"))?;
                let start = Instant::now();
                pod.delete_link(link.index).await?;
                start.elapsed()
            }
            _ => anyhow::bail!("usage: veth_floor create <netns> <name> | delete <name> | delete-pod <netns>"),
        };
        eprintln!("{}", elapsed.as_micros());
        Ok(())
    })
}
