//! Advertising this node's pod CIDRs and their approval: AdvertiseRoutes ⊇ pod CIDRs in
//! tailscaled's prefs (read, merge, write; only routes HeadCNI added are ever withdrawn), and,
//! with an API key, this node's own routes approved in Headscale (read, merge, write); in
//! controller mode, this node's node key published on its Node for `headcni controller`;
//! otherwise what the node can see of the policy's autoApprovers.

use super::{Reconciler, list, set};
use crate::agent::hostnet::HostNetwork;
use crate::agent::node::PodCidrSource;
use crate::agent::report::ProblemId;
use crate::clients::headscale::{HeadscaleApi, HeadscaleError, MIN_VERSION, parse_version};
use crate::clients::localapi::{LocalApi, Prefs, PrefsEdit, Status, filter_admits};
use ipnetwork::IpNetwork;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Once Headscale confirmed the approval, ask it again only this often.
pub const APPROVAL_RECHECK: Duration = Duration::from_secs(300);

/// AdvertiseRoutes after merging: `desired` added, routes HeadCNI added that are no longer
/// desired (`ours − desired`) removed, everything else kept verbatim. Answers the new list,
/// the routes added and the routes removed.
pub fn merge_routes(
    current: &[String],
    desired: &BTreeSet<IpNetwork>,
    ours: &BTreeSet<IpNetwork>,
) -> (Vec<String>, BTreeSet<IpNetwork>, BTreeSet<IpNetwork>) {
    let stale: BTreeSet<IpNetwork> = ours.difference(desired).copied().collect();
    let mut out = Vec::new();
    let mut removed = BTreeSet::new();
    let mut present = BTreeSet::new();
    for r in current {
        match r.parse::<IpNetwork>() {
            Ok(net) if stale.contains(&net) => {
                removed.insert(net);
            }
            Ok(net) => {
                present.insert(net);
                out.push(r.clone());
            }
            Err(_) => out.push(r.clone()),
        }
    }
    let added: BTreeSet<IpNetwork> = desired.difference(&present).copied().collect();
    out.extend(added.iter().map(ToString::to_string));
    (out, added, removed)
}

/// The approved set to write: everything approved now, minus what HeadCNI approved earlier and
/// no longer wants, plus the desired routes the node actually advertises. Never a route the
/// node did not advertise.
pub fn merge_approvals(
    approved: &BTreeSet<IpNetwork>,
    available: &BTreeSet<IpNetwork>,
    desired: &BTreeSet<IpNetwork>,
    ours: &BTreeSet<IpNetwork>,
) -> BTreeSet<IpNetwork> {
    let stale: BTreeSet<IpNetwork> = ours.difference(desired).copied().collect();
    let wanted: BTreeSet<IpNetwork> = desired.intersection(available).copied().collect();
    approved.difference(&stale).copied().chain(wanted).collect()
}

impl<K: PodCidrSource, T: LocalApi, H: HeadscaleApi, D: HostNetwork> Reconciler<K, T, H, D> {
    pub(super) async fn step_prefs(&mut self, status: &Status, desired: &BTreeSet<IpNetwork>) -> Option<Prefs> {
        let prefs = match self.ts.prefs().await {
            Ok(p) => p,
            Err(e) => {
                self.fail(ProblemId::Prefs, e.to_string(), None);
                return None;
            }
        };
        if let Some(url) = &self.cfg.headscale_url
            && status.is_running()
            && !prefs.control_url.is_empty()
            && prefs.control_url.trim_end_matches('/') != url
        {
            self.warn(
                ProblemId::PrefsControlUrl,
                format!(
                    "tailscaled is logged in to {}, not to --headscale-url {url}; HeadCNI leaves the login alone",
                    prefs.control_url
                ),
                Some("log the node out (tailscale logout) to let the agent join the right server"),
            );
        }
        let ours = match self.state() {
            Some(s) => s.advertised_routes.clone(),
            None => return Some(prefs),
        };
        let (routes, added, removed) = merge_routes(&prefs.advertise_routes, desired, &ours);
        let mut edit = PrefsEdit::default();
        if routes != prefs.advertise_routes {
            edit.advertise_routes = Some(routes);
        }
        if !prefs.route_all {
            edit.route_all = Some(true);
        }
        if !prefs.no_snat {
            edit.no_snat = Some(true);
        }
        // Routes stale in the record but already gone from the prefs: forget them.
        let forgotten: BTreeSet<IpNetwork> =
            ours.difference(desired).filter(|r| !prefs.advertises(r)).copied().collect();
        if edit.is_empty() {
            if !forgotten.is_empty()
                && let Some(st) = self.state()
            {
                st.advertised_routes.retain(|r| !forgotten.contains(r));
                self.store_state();
            }
            return Some(prefs);
        }
        if !added.is_empty() {
            if let Some(st) = self.state() {
                st.advertised_routes.extend(added.iter().copied());
            }
            if !self.store_state() {
                return Some(prefs);
            }
        }
        match self.ts.edit_prefs(&edit).await {
            Ok(new) => {
                let mut what = Vec::new();
                if !added.is_empty() {
                    what.push(format!("advertised {}", list(&added)));
                }
                if !removed.is_empty() {
                    what.push(format!("withdrew {} (no longer this node's)", list(&removed)));
                }
                if edit.route_all.is_some() {
                    what.push("accept-routes on".into());
                }
                if edit.no_snat.is_some() {
                    what.push("subnet SNAT off".into());
                }
                log::info!("tailscale prefs: {}", what.join(", "));
                if !removed.is_empty() || !forgotten.is_empty() {
                    if let Some(st) = self.state() {
                        st.advertised_routes.retain(|r| !removed.contains(r) && !forgotten.contains(r));
                    }
                    self.store_state();
                }
                Some(new)
            }
            Err(e) => {
                self.fail(ProblemId::Prefs, format!("updating tailscale prefs: {e}"), None);
                Some(prefs)
            }
        }
    }

    pub(super) async fn step_approval(
        &mut self,
        status: &Status,
        prefs: &Prefs,
        desired: &BTreeSet<IpNetwork>,
    ) -> Option<BTreeSet<IpNetwork>> {
        let advertised: BTreeSet<IpNetwork> = desired.iter().filter(|c| prefs.advertises(c)).copied().collect();
        if self.hs.is_none() {
            let served = set(&status.self_.served_routes());
            let approved: BTreeSet<IpNetwork> = desired.intersection(&served).copied().collect();
            let pending: BTreeSet<IpNetwork> = advertised.difference(&approved).copied().collect();
            if pending.is_empty() {
                self.note_approved();
            } else if self.cfg.publish_identity {
                let word = match self.cidrs.binding().approval {
                    Some(s) if !s.message.is_empty() => {
                        format!(" (the controller: {}: {})", s.state.as_str(), s.message)
                    }
                    Some(s) => format!(" (the controller: {})", s.state.as_str()),
                    None => " (no word from the controller on this Node yet)".into(),
                };
                self.wait(
                    ProblemId::Approval,
                    format!("route {} pending approval by the controller{word}", list(&pending)),
                    Some(
                        "headcni controller approves the Node's pod CIDRs on the tailnet node whose key the agent \
                         published; see its log and headcni_controller_mismatches (a node learns of an approval \
                         when it next hears from Headscale; other nodes route at once)",
                    ),
                );
            } else {
                self.wait(
                    ProblemId::Approval,
                    format!("route {} pending approval in Headscale", list(&pending)),
                    Some(&format!(
                        "the policy's autoApprovers must cover it for this node's tag or user, or approve it: \
                         headscale nodes approve-routes --identifier <id> --routes {} (a node learns of an approval \
                         made by hand only when it next reconnects to Headscale; other nodes route at once)",
                        list(&pending)
                    )),
                );
            }
            return Some(approved);
        }
        let key = status.node_key().unwrap_or_default().to_string();
        if let Some((confirmed, confirmed_key, at)) = &self.approval_confirmed
            && confirmed == desired
            && *confirmed_key == key
            && at.elapsed() < APPROVAL_RECHECK
        {
            return Some(desired.clone());
        }
        match self.approve_with_api(status, desired).await {
            Ok(approved) => {
                let pending: BTreeSet<IpNetwork> = desired.difference(&approved).copied().collect();
                if pending.is_empty() {
                    self.approval_confirmed = Some((desired.clone(), key, Instant::now()));
                    self.note_approved();
                } else {
                    self.wait(
                        ProblemId::Approval,
                        format!("route {} pending approval: Headscale has not seen it advertised yet", list(&pending)),
                        None,
                    );
                }
                Some(approved)
            }
            Err(e) => {
                let hint = match &e {
                    HeadscaleError::Unreachable { .. } => Some("approval is retried; pods keep working meanwhile"),
                    _ => None,
                };
                self.fail(ProblemId::Approval, e.to_string(), hint);
                None
            }
        }
    }

    /// The approved routes that the packet filter in force on this node lets traffic in to (from
    /// the cluster CIDRs, when they are known). Headscale sends a node the filter that covers a
    /// newly approved route apart from the route, and often a moment after it: until then the
    /// other nodes already route to this node's pods, but tailscaled drops the connections they
    /// open (replies to this node's own connections pass). `None` when the filter cannot be read.
    pub(super) async fn step_packet_filter(&mut self, approved: &BTreeSet<IpNetwork>) -> Option<BTreeSet<IpNetwork>> {
        let rules = match self.ts.packet_filter().await {
            Ok(rules) => rules,
            Err(e) => {
                log::debug!("reading tailscaled's packet filter: {e}");
                return None;
            }
        };
        let sources = &self.cfg.cluster_cidrs;
        let admitted: BTreeSet<IpNetwork> =
            approved.iter().filter(|c| filter_admits(&rules, c, sources)).copied().collect();
        let shut: BTreeSet<IpNetwork> = approved.difference(&admitted).copied().collect();
        if !shut.is_empty() {
            let (from, cluster) = if sources.is_empty() {
                ("the tailnet".to_string(), "<cluster CIDR>".to_string())
            } else {
                let all: BTreeSet<IpNetwork> = sources.iter().copied().collect();
                (list(&all), sources[0].to_string())
            };
            self.wait(
                ProblemId::PacketFilter,
                format!(
                    "tailscaled's packet filter lets nothing from {from} in to {}: pods on other nodes cannot open \
                     connections to this node's pods yet",
                    list(&shut)
                ),
                Some(&format!(
                    "Headscale sends the filter for a newly approved route a moment after the route; if this stays, \
                     the tailnet policy has no ACL entry that lets pods in, such as {{\"action\": \"accept\", \
                     \"src\": [\"{cluster}\"], \"dst\": [\"{cluster}:*\"]}} (tailscale debug localapi POST \
                     debug-packet-filter-rules shows the filter in force)"
                )),
            );
        }
        Some(admitted)
    }

    /// Controller mode: this node's node key on its Node, where the controller binds the two.
    pub(super) async fn step_identity(&mut self, status: &Status) {
        let Some(key) = status.node_key().map(str::to_string) else { return };
        if let Err(e) = crate::binding::NodeKey::parse(&key) {
            self.fail(ProblemId::Identity, format!("tailscaled's node key cannot be published: {e}"), None);
            return;
        }
        let published = self.cidrs.binding().published;
        match published {
            // The Node not read yet: the next pass (woken by the watch) decides.
            None => return,
            Some(Some(k)) if k == key => return,
            _ => {}
        }
        match self.cidrs.publish_node_key(&key).await {
            Ok(()) => log::info!("published this node's tailnet identity {key} on its Node for the controller"),
            Err(e) => self.fail(ProblemId::Identity, format!("publishing this node's tailnet identity: {e}"), None),
        }
    }

    pub(super) fn note_approved(&mut self) {
        if self.approved_in.is_none()
            && let Some(at) = self.advertised_at
        {
            self.approved_in = Some(at.elapsed());
        }
    }

    pub(super) async fn approve_with_api(
        &mut self,
        status: &Status,
        desired: &BTreeSet<IpNetwork>,
    ) -> Result<BTreeSet<IpNetwork>, HeadscaleError> {
        let Some(hs) = self.hs.as_ref() else { return Ok(BTreeSet::new()) };
        let m = self.metrics.clone();
        let counted = |operation: &'static str| {
            let errors = m.headscale_errors(operation);
            move |e: HeadscaleError| {
                errors.inc();
                e
            }
        };
        if !self.headscale_checked {
            if let Some(v) = hs.version().await.map_err(counted("version"))?
                && let Some(mm) = parse_version(&v)
                && mm < MIN_VERSION
            {
                return Err(HeadscaleError::TooOld { version: v });
            }
            self.headscale_checked = true;
        }
        let Some(key) = status.node_key() else { return Ok(BTreeSet::new()) };
        let nodes = hs.nodes().await.map_err(counted("list_nodes"))?;
        let Some(node) = nodes.into_iter().find(|n| n.node_key == key) else {
            return Err(HeadscaleError::Status {
                what: "finding this node".into(),
                status: hyper::StatusCode::NOT_FOUND,
                msg: format!(
                    "no node with this node's key ({key}); is --headscale-url the server tailscaled is logged in to?"
                ),
            });
        };
        if !node.has_route_api() {
            return Err(HeadscaleError::TooOld { version: "(the server)".into() });
        }
        let approved = set(&node.approved());
        let available = set(&node.available());
        let ours = {
            let node_id = node.id.clone();
            let Some(st) = self.state() else { return Ok(approved.intersection(desired).copied().collect()) };
            if st.approved_node_id.as_deref() != Some(node_id.as_str()) {
                // A new registration: approvals recorded for an older node id are not this node's.
                if let Some(old) = st.approved_node_id.replace(node_id.clone())
                    && !st.approved_routes.is_empty()
                {
                    log::info!(
                        "this node registered again in Headscale (node id {old} -> {node_id}); the old registration \
                         keeps its approvals: remove it with `headscale nodes delete --identifier {old}`"
                    );
                }
                st.approved_routes.clear();
            }
            st.approved_routes.clone()
        };
        let next = merge_approvals(&approved, &available, desired, &ours);
        if next == approved {
            return Ok(approved.intersection(desired).copied().collect());
        }
        let adding: BTreeSet<IpNetwork> = next.difference(&approved).copied().collect();
        let dropping: BTreeSet<IpNetwork> = approved.difference(&next).copied().collect();
        if let Some(st) = self.state() {
            st.approved_routes.extend(adding.iter().copied());
        }
        if !self.store_state() {
            return Ok(approved.intersection(desired).copied().collect());
        }
        let Some(hs) = self.hs.as_ref() else { return Ok(BTreeSet::new()) };
        let routes: Vec<IpNetwork> = next.iter().copied().collect();
        let result = hs.approve_routes(&node.id, &routes).await.map_err(counted("approve_routes"))?;
        let now_approved = set(&result.approved());
        log::info!(
            "Headscale: {}{} for node {} (id {}); approved now: {}",
            if adding.is_empty() { String::new() } else { format!("approved {}", list(&adding)) },
            if dropping.is_empty() { String::new() } else { format!(" withdrew approval of {}", list(&dropping)) },
            node.display_name(),
            node.id,
            list(&now_approved)
        );
        if !dropping.is_empty() {
            if let Some(st) = self.state() {
                st.approved_routes.retain(|r| !dropping.contains(r));
            }
            self.store_state();
        }
        Ok(now_approved.intersection(desired).copied().collect())
    }
}
