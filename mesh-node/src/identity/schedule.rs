//! When to ask for certificates: pure functions of the clock reading, the certificates held
//! and a random number, so that every decision is table-tested.
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use mesh_api::Identity;

use crate::control::Backoff;

/// How certificates are renewed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenewPolicy {
    /// Renew when this fraction of the certificate's life has passed (0.5: half-life).
    pub renew_fraction: f64,
    /// Renewal moves earlier by up to this fraction of the life, at random, so a node's
    /// certificates (and all nodes') do not renew in lockstep.
    pub jitter_fraction: f64,
    /// Never renew sooner than this after receiving a certificate, however short its life.
    pub min_interval: Duration,
    /// Retries after a failed request.
    pub backoff: Backoff,
    /// Floor of the retry delay when expiry is close and retries speed up.
    pub min_retry: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        RenewPolicy {
            renew_fraction: 0.5,
            jitter_fraction: 0.1,
            min_interval: Duration::from_secs(1),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            min_retry: Duration::from_millis(250),
        }
    }
}

/// When to renew a certificate received at `received_at`.
///
/// The life is counted from when the node received the certificate, or from `not_before`
/// if that is later: the controller backdates `not_before` (5 minutes, against clock skew),
/// and counting from it would make a short-lived certificate look half-spent on arrival.
pub fn renew_at(
    received_at: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    policy: &RenewPolicy,
    random: f64,
) -> SystemTime {
    let start = received_at.max(not_before);
    let life = not_after.duration_since(start).unwrap_or_default();
    let random = if random.is_finite() {
        random.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let fraction = (policy.renew_fraction - policy.jitter_fraction * random).clamp(0.0, 1.0);
    (start + life.mul_f64(fraction)).max(received_at + policy.min_interval)
}

/// When to try again after `failures` (≥ 1) consecutive failed requests. With a certificate
/// still valid until `not_after`, retries never wait past half of the time it has left, so
/// a short outage does not cost the identity; they stay at least `min_retry` apart.
pub fn retry_at(
    now: SystemTime,
    failures: u32,
    not_after: Option<SystemTime>,
    policy: &RenewPolicy,
    random: f64,
) -> SystemTime {
    let mut delay = policy.backoff.delay(failures.saturating_sub(1), random);
    if let Some(left) = not_after.and_then(|t| t.duration_since(now).ok()) {
        delay = delay.min((left / 2).max(policy.min_retry));
    }
    now + delay
}

/// What the planner needs to know of one identity the manager tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// When the next request is due.
    pub due: SystemTime,
    /// A request is under way.
    pub in_flight: bool,
    /// Expiry of the certificate held, if any.
    pub not_after: Option<SystemTime>,
}

/// What the manager should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Identities that left the node: cancel, forget, wipe their keys.
    pub drop: Vec<Identity>,
    /// New identities to track (a request for each is in `request`).
    pub add: Vec<Identity>,
    /// Certificates that expired before a renewal arrived: stop serving them.
    pub expired: Vec<Identity>,
    /// Identities to request a certificate for now.
    pub request: Vec<Identity>,
    /// When to plan again, if nothing else happens first.
    pub wake_at: Option<SystemTime>,
}

pub fn plan(now: SystemTime, desired: &BTreeSet<Identity>, slots: &BTreeMap<Identity, SlotView>) -> Plan {
    let mut plan = Plan::default();
    let wake = |t: SystemTime, plan: &mut Plan| {
        plan.wake_at = Some(plan.wake_at.map_or(t, |w| w.min(t)));
    };
    for id in slots.keys().filter(|id| !desired.contains(*id)) {
        plan.drop.push(id.clone());
    }
    for id in desired {
        let Some(slot) = slots.get(id) else {
            plan.add.push(id.clone());
            plan.request.push(id.clone());
            continue;
        };
        match slot.not_after {
            Some(t) if t <= now => plan.expired.push(id.clone()),
            Some(t) => wake(t, &mut plan),
            None => {}
        }
        if slot.in_flight {
            continue;
        }
        if slot.due <= now {
            plan.request.push(id.clone());
        } else {
            wake(slot.due, &mut plan);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    fn policy() -> RenewPolicy {
        RenewPolicy::default()
    }

    #[test]
    fn renews_at_half_life_counted_from_arrival_with_jitter_earlier() {
        let p = policy();
        // (received, not_before, not_after, random, want)
        let day = 24 * 3600;
        let cases = [
            // 24 h certificate backdated 5 minutes: half of the 24 h from arrival.
            (t(300), t(0), t(300 + day), 0.0, t(300 + day / 2)),
            // Full jitter moves it 10% of the life earlier: at 40%.
            (t(300), t(0), t(300 + day), 1.0, t(300 + day * 2 / 5)),
            // A 10 s certificate: renew after 5 s, not at once.
            (t(300), t(0), t(310), 0.0, t(305)),
            // not_before later than arrival (a clock behind the CA's): counted from it.
            (t(0), t(100), t(200), 0.0, t(150)),
            // Tiny or already expired lives: no sooner than min_interval.
            (t(100), t(0), t(100), 0.0, t(101)),
            (t(100), t(0), t(50), 0.5, t(101)),
        ];
        for (i, (received, nb, na, random, want)) in cases.into_iter().enumerate() {
            assert_eq!(renew_at(received, nb, na, &p, random), want, "case {i}");
        }
        // Random values outside [0, 1] are clamped.
        assert_eq!(renew_at(t(0), t(0), t(100), &p, f64::NAN), t(50));
        assert_eq!(renew_at(t(0), t(0), t(100), &p, 7.0), t(40));
    }

    #[test]
    fn retries_back_off_but_not_past_half_the_time_left() {
        let p = policy();
        let cases = [
            // (failures, not_after, random, want delay)
            (1, None, 0.0, S / 2),
            (1, None, 1.0, S),
            (2, None, 0.0, S),
            (4, None, 0.0, 4 * S),
            (30, None, 0.0, 30 * S),
            (30, None, 1.0, 60 * S),
            (30, Some(t(3600)), 1.0, 60 * S),
            // 20 s left: wait at most 10 s.
            (30, Some(t(20)), 1.0, 10 * S),
            // Almost expired: min_retry.
            (30, Some(t(0) + Duration::from_millis(100)), 1.0, p.min_retry),
            // Already expired: plain backoff.
            (3, Some(SystemTime::UNIX_EPOCH), 0.0, 2 * S),
        ];
        for (i, (failures, not_after, random, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                retry_at(t(0), failures, not_after, &p, random),
                t(0) + want,
                "case {i}"
            );
        }
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
    }

    #[test]
    fn plans_requests_drops_and_expiry() {
        let desired: BTreeSet<Identity> = ["new", "due", "later", "busy", "expired"]
            .into_iter()
            .map(id)
            .collect();
        let slot = |due, in_flight, not_after| SlotView {
            due,
            in_flight,
            not_after,
        };
        let slots = BTreeMap::from([
            (id("due"), slot(t(10), false, Some(t(100)))),
            (id("later"), slot(t(50), false, Some(t(100)))),
            (id("busy"), slot(t(5), true, Some(t(30)))),
            (id("expired"), slot(t(0), false, Some(t(9)))),
            (id("gone"), slot(t(50), true, Some(t(100)))),
        ]);
        let p = plan(t(10), &desired, &slots);
        assert_eq!(p.drop, [id("gone")]);
        assert_eq!(p.add, [id("new")]);
        assert_eq!(p.expired, [id("expired")]);
        assert_eq!(p.request, [id("due"), id("expired"), id("new")]);
        // The busy certificate's expiry (t30) comes before "later"'s renewal (t50).
        assert_eq!(p.wake_at, Some(t(30)));

        let idle = plan(t(10), &BTreeSet::new(), &BTreeMap::new());
        assert_eq!(idle, Plan::default());
    }
}
