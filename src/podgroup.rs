//! The interface group that tags a pod's host interface with the pod's namespace, so that the
//! policy engine can tell which namespace a packet's pod belongs to before it knows the pod's
//! addresses (the moment between the plugin's ADD and the engine hearing of the pod). The
//! plugin sets it on the host end of the pair when `enable_network_policy` is on; the engine
//! keys its rules for pods not known yet by it.
//!
//! The high bit marks HeadCNI's groups (0, the kernel's default, is "untagged"); the rest is a
//! hash of the namespace's name. Two namespaces may share a group: the engine then takes the
//! stricter rule for both.

/// The group of pods of `namespace`.
pub fn namespace_group(namespace: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in namespace.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    0x8000_0000 | (hash & 0x7fff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_tagged_and_stable() {
        assert_eq!(namespace_group("default"), namespace_group("default"));
        assert_ne!(namespace_group("default"), namespace_group("kube-system"));
        for ns in ["", "a", "kube-system", "x-very-long-namespace-name-of-63-characters-which-is-the-limit"] {
            assert!(namespace_group(ns) & 0x8000_0000 != 0);
        }
    }
}
