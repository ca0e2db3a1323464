//! Which role hook a node runs for an instance it hosts, from the applied state: the node's
//! half of a failover. `on_demote` when its primary is asked to step down (once per term,
//! and again after a demotion that failed was called off), `on_promote` when it became
//! primary with a new fencing token, `on_role_change` when the service's primary changed
//! and this instance is not it. A node restarted mid-way starts with no memory and runs the
//! hooks for the current state again: hooks are at least once, idempotent per token.

use crate::service::InstanceRole;

/// A role hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    OnPromote,
    OnDemote,
    OnRoleChange,
}

impl Hook {
    /// The name in the policy, the hook reports and the events.
    pub fn name(self) -> &'static str {
        match self {
            Hook::OnPromote => "on_promote",
            Hook::OnDemote => "on_demote",
            Hook::OnRoleChange => "on_role_change",
        }
    }
}

/// One hosted instance as applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub role: InstanceRole,
    /// It is the service's primary.
    pub is_primary: bool,
    /// The service's primary was asked to step down.
    pub demoting: bool,
    /// The service's fencing token.
    pub token: u64,
    /// The service has a primary (this instance or another).
    pub service_has_primary: bool,
}

/// What the node last acted on for one hosted instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookMemory {
    role: Option<InstanceRole>,
    token: u64,
    demoted_for: Option<u64>,
}

impl HookMemory {
    /// The hook the applied state now asks for, if any; remembers that it was asked.
    pub fn due(&mut self, now: Applied) -> Option<Hook> {
        if !now.demoting {
            // A demotion that failed was called off: a later one runs the hook again.
            self.demoted_for = None;
        }
        if now.is_primary && now.demoting && self.demoted_for != Some(now.token) {
            self.demoted_for = Some(now.token);
            return Some(Hook::OnDemote);
        }
        if self.role == Some(now.role) && self.token == now.token {
            return None;
        }
        let was_primary = self.role == Some(InstanceRole::Primary);
        self.role = Some(now.role);
        self.token = now.token;
        if now.is_primary {
            Some(Hook::OnPromote)
        } else if now.service_has_primary || was_primary {
            Some(Hook::OnRoleChange)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(role: InstanceRole, token: u64, demoting: bool, has_primary: bool) -> Applied {
        Applied {
            role,
            is_primary: role == InstanceRole::Primary,
            demoting,
            token,
            service_has_primary: has_primary,
        }
    }

    #[test]
    fn a_promotion_runs_on_promote_once_per_token() {
        let mut memory = HookMemory::default();
        let primary = applied(InstanceRole::Primary, 7, false, true);
        assert_eq!(memory.due(primary), Some(Hook::OnPromote));
        assert_eq!(memory.due(primary), None);
        assert_eq!(
            memory.due(applied(InstanceRole::Primary, 9, false, true)),
            Some(Hook::OnPromote)
        );
    }

    #[test]
    fn a_demotion_runs_on_demote_once_and_again_after_it_was_called_off() {
        let mut memory = HookMemory::default();
        memory.due(applied(InstanceRole::Primary, 7, false, true));
        let asked = applied(InstanceRole::Primary, 7, true, true);
        assert_eq!(memory.due(asked), Some(Hook::OnDemote));
        assert_eq!(memory.due(asked), None);
        // The hook failed; the demotion was called off, then asked for again.
        assert_eq!(memory.due(applied(InstanceRole::Primary, 7, false, true)), None);
        assert_eq!(memory.due(asked), Some(Hook::OnDemote));
    }

    #[test]
    fn a_replica_hears_of_a_new_primary_and_a_released_primary_of_its_release() {
        let mut replica = HookMemory::default();
        assert_eq!(
            replica.due(applied(InstanceRole::Replica, 0, false, false)),
            None,
            "nobody primary yet"
        );
        assert_eq!(
            replica.due(applied(InstanceRole::Replica, 7, false, true)),
            Some(Hook::OnRoleChange)
        );
        assert_eq!(replica.due(applied(InstanceRole::Replica, 7, false, true)), None);
        let mut old = HookMemory::default();
        old.due(applied(InstanceRole::Primary, 7, false, true));
        assert_eq!(
            old.due(applied(InstanceRole::Replica, 7, false, false)),
            Some(Hook::OnRoleChange),
            "released, nobody primary yet"
        );
    }

    #[test]
    fn hook_names_are_the_policys() {
        assert_eq!(
            [Hook::OnPromote, Hook::OnDemote, Hook::OnRoleChange].map(Hook::name),
            ["on_promote", "on_demote", "on_role_change"]
        );
    }
}
