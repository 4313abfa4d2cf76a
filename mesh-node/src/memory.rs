//! The allocator's footprint. glibc keeps what a burst of connections freed, in one arena per
//! thread that ever allocated, so a node proxy's RSS would stay at its busiest hour's. Fewer
//! arenas and a periodic trim hand it back.
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Arenas for the whole process: the runtime's workers share them instead of one each.
const ARENAS: i32 = 2;
/// How often freed memory is returned to the system.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Caps the number of malloc arenas; call before the runtime starts its threads.
pub fn limit_arenas() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns free heap memory to the system every few seconds until `stop`.
pub async fn trim_periodically(stop: CancellationToken) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                // SAFETY: malloc_trim only releases free memory of the allocator's own heaps.
                unsafe { libc::malloc_trim(0) };
            }
        }
    }
}
