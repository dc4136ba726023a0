//! The clients of HeadCNI's peers, shared by every role that talks to them (the agent, the
//! `status` and `teardown` commands, and a cluster-wide controller): none of them knows who
//! calls it.
//!
//! - [`http`]: HTTP/1.1 over TCP, TLS or a unix socket, with deadlines and size caps
//! - [`kube`]: the Kubernetes API (typed object references; GET, merge PATCH, LIST, WATCH)
//! - [`headscale`]: Headscale's REST API (nodes, route approval)
//! - [`localapi`]: tailscaled's LocalAPI (status, prefs, the zero-config join)
//! - [`secret`]: secrets read from files or the environment, never printed

pub mod headscale;
pub mod http;
pub mod kube;
pub mod localapi;
pub mod secret;
