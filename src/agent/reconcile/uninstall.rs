//! The uninstall signal's state machine around the passes (see the diagram in [`super`]):
//! Normal, TearingDown (the cleanup, retried until it succeeds), TornDown (not ready, nothing
//! touched); only an explicit "false" returns to Normal.

use super::{PassOutcome, Reconciler};
use crate::agent::cleanup::{CleanupScope, cleanup_with};
use crate::agent::hostnet::HostNetwork;
use crate::agent::node::PodCidrSource;
use crate::agent::report::{self, ProblemId};
use crate::agent::serve::now;
use crate::agent::teardown::{Signal, SignalState};
use crate::clients::headscale::HeadscaleApi;
use crate::clients::localapi::LocalApi;

/// Where the uninstall signal has put the agent (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    TearingDown,
    TornDown,
}

impl<K: PodCidrSource, T: LocalApi, H: HeadscaleApi, D: HostNetwork> Reconciler<K, T, H, D> {
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// One pass under the uninstall signal: a normal pass, or a teardown step.
    pub async fn pass(&mut self, signal: &SignalState) -> PassOutcome {
        self.signal_problem = signal.problem.clone();
        let tear = match signal.signal {
            Signal::Teardown => true,
            Signal::Normal => false,
            // Unknown or gone: only an explicit "false" ends a teardown.
            Signal::Unknown | Signal::Absent => self.mode != Mode::Normal,
        };
        if tear {
            return self.teardown().await;
        }
        if self.mode != Mode::Normal {
            log::info!("the uninstall signal is \"false\" again (upgrade or rollback): resuming");
            self.resume();
        }
        self.reconcile().await
    }

    /// Leaves teardown: everything cached about what was advertised or approved is stale, and
    /// the binaries the uninstall removed go back (the pass republishes the conflist).
    pub(super) fn resume(&mut self) {
        if let Some(dir) = self.cfg.cni_files.bin_dir.clone() {
            match crate::install::install_binaries(&dir) {
                Ok(out) => out.changed.iter().for_each(|p| log::info!("put back {}", p.display())),
                Err(e) => log::error!("putting HeadCNI's binaries back into {}: {e}", dir.display()),
            }
        }
        self.mode = Mode::Normal;
        self.state = None;
        self.approval_confirmed = None;
        self.advertised_at = None;
    }

    pub(super) fn report_signal_problem(&mut self) {
        if let Some(p) = self.signal_problem.clone() {
            self.warn(
                ProblemId::UninstallSignal,
                p,
                Some("the agent runs normally meanwhile; check --teardown-configmap and the agent's Role"),
            );
        }
    }

    /// One teardown step: the cleanup until it succeeds, then nothing.
    pub(super) async fn teardown(&mut self) -> PassOutcome {
        if self.mode == Mode::Normal {
            // The checks behind the normal pass's problems stop: they are not "resolved".
            self.problems.forget_all();
        }
        self.problems.begin_pass();
        self.report_signal_problem();
        if self.mode == Mode::Normal {
            log::info!(
                "uninstall signal: withdrawing this node's routes and approvals, removing its rules and nft tables; \
                 no more reconciling; HeadCNI's conflist and binaries leave the CNI directories (running pods keep their addresses and their traffic within this node)"
            );
            self.mode = Mode::TearingDown;
        }
        if self.mode == Mode::TearingDown {
            let errors = cleanup_with(&self.cfg, &self.ts, self.hs.as_ref(), &self.dp, CleanupScope::Uninstall).await;
            // The record changed under the reconciler.
            self.state = None;
            self.approval_confirmed = None;
            self.advertised_at = None;
            if errors.is_empty() {
                self.mode = Mode::TornDown;
                log::info!("uninstall: this node's routes are withdrawn; answering not ready from now on");
            } else {
                self.fail(
                    ProblemId::Teardown,
                    format!("uninstall: {errors}"),
                    Some("retried; the uninstall hook waits for this agent until its timeout"),
                );
            }
        }
        self.problems.end_pass();
        let mut report = self.report.clone();
        report.updated_at = now();
        report.version = crate::VERSION.to_string();
        report.teardown = match self.mode {
            Mode::TornDown => "done",
            _ => "in progress",
        }
        .to_string();
        if self.mode == Mode::TornDown {
            report.ready = false;
            for r in &mut report.routes {
                r.advertised = false;
                r.approved = None;
                r.admitted = None;
            }
            self.health.set_ready(
                false,
                "uninstalling: this node's routes were withdrawn (the uninstall signal ConfigMap says teardown)",
            );
            self.metrics.routes_advertised.set(0);
            self.metrics.routes_approved.set(0);
            self.metrics.routes_pending_approval.set(0);
            self.metrics.routes_not_admitted.set(0);
            self.metrics.ready.set(0);
        }
        report.problems = self.problems.list();
        self.health.beat();
        if let Err(e) = report.store(&self.cfg.run_dir) {
            log::debug!("writing {}: {e}", report::path_in(&self.cfg.run_dir).display());
        }
        self.report = report;
        if self.mode == Mode::TornDown { PassOutcome::Converged } else { PassOutcome::Failed }
    }
}
