//! What the anti-spoofing guard costs an ADD, for the benchmark: the plugin opens an nf_tables
//! socket and asks whether the guard's chain exists (one request, one answer). Run inside a
//! network namespace of the benchmark's own (`ip netns exec NS guard_check N`): creates the
//! guard there if needed, then times N of those checks and prints the median and p90 in
//! microseconds, with and without opening the socket.

use headcni::netlink::nft::Nft;
use headcni::podguard;
use std::time::{Duration, Instant};

fn percentile(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1e6
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let mut nft = Nft::connect()?;
    podguard::ensure(&mut nft)?;
    let mut with_socket = Vec::with_capacity(n);
    let mut check_only = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut fresh = Nft::connect()?;
        let created = podguard::ensure(&mut fresh)?;
        with_socket.push(t.elapsed());
        anyhow::ensure!(!created, "the guard vanished");
        let t = Instant::now();
        podguard::ensure(&mut nft)?;
        check_only.push(t.elapsed());
    }
    println!(
        "socket + check: median {:.1} us, p90 {:.1} us; check alone: median {:.1} us, p90 {:.1} us ({n} times)",
        percentile(&mut with_socket, 0.5),
        percentile(&mut with_socket, 0.9),
        percentile(&mut check_only, 0.5),
        percentile(&mut check_only, 0.9)
    );
    Ok(())
}
