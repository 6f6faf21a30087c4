//! Where a step's time goes, for `dptrain bench`: phase marks placed along the DP step (forward,
//! backward, per-example gradients, clipping, noise, …) that cost one thread-local check when
//! profiling is off (always, in training). When on, each mark synchronises the device and adds
//! the time since the previous mark to the phase it names (the phase that just ended).

use candle_core::{Device, Result};
use std::cell::RefCell;
use std::time::Instant;

struct State {
    last: Instant,
    /// (phase, seconds), in the order phases were first seen.
    totals: Vec<(&'static str, f64)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Start profiling on this thread (clearing earlier totals); the clock starts now.
pub fn start(device: &Device) -> Result<()> {
    device.synchronize()?;
    STATE.with(|s| *s.borrow_mut() = Some(State { last: Instant::now(), totals: Vec::new() }));
    Ok(())
}

/// Is profiling on?
pub fn enabled() -> bool {
    STATE.with(|s| s.borrow().is_some())
}

/// End of `phase`: the time since the previous mark (or `start`) is counted to it. No-op (and no
/// synchronisation) when profiling is off.
pub fn mark(device: &Device, phase: &'static str) -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    device.synchronize()?;
    let now = Instant::now();
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            let dt = now.duration_since(st.last).as_secs_f64();
            st.last = now;
            match st.totals.iter_mut().find(|(p, _)| *p == phase) {
                Some((_, t)) => *t += dt,
                None => st.totals.push((phase, dt)),
            }
        }
    });
    Ok(())
}

/// Stop profiling; the seconds per phase since `start`.
pub fn stop() -> Vec<(&'static str, f64)> {
    STATE.with(|s| s.borrow_mut().take().map(|st| st.totals).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_count_time_to_the_phase_that_ended_and_nothing_when_off() {
        let d = Device::Cpu;
        mark(&d, "ignored").unwrap();
        assert!(stop().is_empty());
        start(&d).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark(&d, "a").unwrap();
        mark(&d, "b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        mark(&d, "a").unwrap();
        let t = stop();
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), ["a", "b"]);
        assert!(t[0].1 >= 0.030 && t[1].1 < 0.005, "{t:?}");
        assert!(!enabled());
    }
}
